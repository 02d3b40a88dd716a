"""Bare parameters under tensor parallelism (experts' 3-D weights, per-head attention sinks)."""

from __future__ import annotations

import torch
from torch import nn

from core.distributed import get_tp_group
from core.errors import CheckpointError
from core.layers.partition import split_evenly, take, tensor_shape


def sharded_parameter(full_shape: tuple[int, ...], group: str, dim: int | None = None,
                      summand: bool = False, segments: int = 1, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialised parameter holding this rank's part of a `full_shape` checkpoint tensor.

    dim: split that dimension evenly over `group` (a contiguous block per rank).
    segments: that dimension is `segments` equal parts stored one after the other (experts' gate|up), each
    split on its own; the rank keeps its slice of each, in order.
    summand: the tensor is added to an output that the group sums afterwards (e.g. the experts' down-projection
    bias), so only the group's first rank holds it and the others hold zeros: it is counted once.
    dtype: as the model's code built it (gpt-oss-style sinks kept in float32); None is torch's default.
    """
    tp = get_tp_group(group)
    full_shape = tuple(full_shape)
    local_shape = list(full_shape)
    segment = None
    if dim is not None:
        parts = f" (each of its {segments} parts)" if segments > 1 else ""
        segment = split_evenly(full_shape[dim] // segments, tp, f"dimension {dim % len(full_shape)}{parts} of size")
        local_shape[dim] = segment.local * segments
    param = nn.Parameter(torch.empty(local_shape, dtype=dtype))

    def weight_loader(param: nn.Parameter, loaded) -> None:
        if tensor_shape(loaded) != full_shape:
            raise CheckpointError(f"checkpoint tensor of shape {list(tensor_shape(loaded))} does not fit "
                                  f"{list(full_shape)}")
        if summand and tp.rank != 0:
            param.data.zero_()
        elif segment is None:
            param.data.copy_(loaded[:])
        else:
            part = full_shape[dim] // segments
            pieces = [take(loaded, dim, index * part + segment.start, segment.local) for index in range(segments)]
            param.data.copy_(torch.cat(pieces, dim=dim) if segments > 1 else pieces[0])

    param.weight_loader = weight_loader
    param.tp_group = tp
    param.partition_problem = segment.problem if segment else None
    return param


def local_shard(param: nn.Parameter, group: str, dim: int = 0) -> nn.Parameter:
    """A parameter the model's code already builds at this rank's size (from its local head counts, e.g.
    Gated DeltaNet's `A_log = nn.Parameter(torch.log(A))` over the rank's value heads): its loader reads this
    rank's contiguous block of the checkpoint tensor along `dim`."""
    tp = get_tp_group(group)

    def weight_loader(param: nn.Parameter, loaded) -> None:
        full_shape = tensor_shape(loaded)
        segment = split_evenly(full_shape[dim], tp, f"dimension {dim} of size")
        expected = list(full_shape)
        expected[dim] = segment.local
        if segment.problem or expected != list(param.shape):
            raise CheckpointError(segment.problem or f"checkpoint tensor of shape {list(full_shape)} does not split "
                                                     f"into this rank's {list(param.shape)} along dimension {dim}")
        param.data.copy_(take(loaded, dim, segment.start, segment.local))

    param.weight_loader = weight_loader
    param.tp_group = tp
    return param
