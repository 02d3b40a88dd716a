"""Bare parameters under tensor parallelism (experts' 3-D weights, per-head attention sinks)."""

from __future__ import annotations

import torch
from torch import nn

from core.distributed import get_tp_group
from core.errors import CheckpointError
from core.layers.partition import split_evenly, take, tensor_shape


def sharded_parameter(full_shape: tuple[int, ...], group: str, dim: int | None = None,
                      summand: bool = False) -> nn.Parameter:
    """An uninitialised parameter holding this rank's part of a `full_shape` checkpoint tensor.

    dim: split that dimension evenly over `group` (a contiguous block per rank).
    summand: the tensor is added to an output that the group sums afterwards (e.g. the experts' down-projection
    bias), so only the group's first rank holds it and the others hold zeros: it is counted once.
    """
    tp = get_tp_group(group)
    full_shape = tuple(full_shape)
    local_shape = list(full_shape)
    segment = None
    if dim is not None:
        segment = split_evenly(full_shape[dim], tp, f"dimension {dim % len(full_shape)} of size")
        local_shape[dim] = segment.local
    param = nn.Parameter(torch.empty(local_shape))

    def weight_loader(param: nn.Parameter, loaded) -> None:
        if tensor_shape(loaded) != full_shape:
            raise CheckpointError(f"checkpoint tensor of shape {list(tensor_shape(loaded))} does not fit "
                                  f"{list(full_shape)}")
        if summand and tp.rank != 0:
            param.data.zero_()
        elif segment is None:
            param.data.copy_(loaded[:])
        else:
            param.data.copy_(take(loaded, dim, segment.start, segment.local))

    param.weight_loader = weight_loader
    param.partition_problem = segment.problem if segment else None
    return param
