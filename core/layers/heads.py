"""Move an activation between this rank's heads and all heads, for the few ops that span every head at once
(OLMo-2's q/k RMSNorm normalises the whole q projection, not each head): gather, apply the op whole, scatter.

Heads lie on the last dim in rank order, as the column-parallel projections split them (`split_heads`): a block
of heads per rank, or, with more ranks than heads, each head replicated on consecutive ranks.
"""

from __future__ import annotations

import torch

from torch import nn

from core.distributed import get_tp_group
from core.layers.partition import local_heads, split_heads


def gather_heads(local: torch.Tensor, num_heads: int, group: str) -> torch.Tensor:
    """[..., local_heads * head_dim] on each rank → [..., num_heads * head_dim] on every rank."""
    tp = get_tp_group(group)
    if tp.size == 1:
        return local
    parts = tp.all_gather(local, dim=-1).chunk(tp.size, dim=-1)
    replicas = max(tp.size // num_heads, 1)
    return torch.cat(parts[::replicas], dim=-1)


def scatter_heads(full: torch.Tensor, num_heads: int, group: str) -> torch.Tensor:
    """[..., num_heads * head_dim] → this rank's [..., local_heads * head_dim], the inverse of `gather_heads`."""
    tp = get_tp_group(group)
    if tp.size == 1:
        return full
    segment = split_heads(num_heads, full.shape[-1] // num_heads, tp)
    return full[..., segment.start:segment.start + segment.local]


def local_share(size: int, num_heads: int, group: str) -> int:
    """This rank's part of a size that is `num_heads` equal heads (a Mamba2 mixer's intermediate size)."""
    return size // num_heads * local_heads(num_heads, group)


def over_all_heads(module: nn.Module, num_heads: int, group: str) -> nn.Module:
    """`module` (built at full size) applied to every head at once, as at TP=1: its tensor inputs are gathered
    over the group, its output scattered back to this rank's heads. Hooks, so its parameters keep their names
    (Mamba2's gated RMSNorm over the whole intermediate size when its groups are fewer than the ranks)."""
    if get_tp_group(group).size == 1:
        return module

    def gather_inputs(_, args):
        return tuple(gather_heads(arg, num_heads, group) if isinstance(arg, torch.Tensor) else arg for arg in args)

    def scatter_output(_, args, output):
        return scatter_heads(output, num_heads, group)

    module.register_forward_pre_hook(gather_inputs)
    module.register_forward_hook(scatter_output)
    return module
