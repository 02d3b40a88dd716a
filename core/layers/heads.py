"""Move an activation between this rank's heads and all heads, for the few ops that span every head at once
(OLMo-2's q/k RMSNorm normalises the whole q projection, not each head): gather, apply the op whole, scatter.

Heads lie on the last dim in rank order, as the column-parallel projections split them (`split_heads`): a block
of heads per rank, or, with more ranks than heads, each head replicated on consecutive ranks.
"""

from __future__ import annotations

import torch

from core.distributed import get_tp_group
from core.layers.partition import split_heads


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
