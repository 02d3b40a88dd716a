"""How a size splits over a tensor-parallel group, and the check that names a layer whose sizes do not split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.distributed import TensorParallelGroup, get_tp_group
from core.errors import SettingsError


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + local) of a `full`-row block are this rank's; `problem` says why a split is invalid."""

    full: int
    start: int
    local: int
    problem: str | None = None


def split_evenly(full: int, group: TensorParallelGroup, what: str = "size") -> Segment:
    if full % group.size:
        return Segment(full, 0, full // group.size or 1,
                       f"{what} {full} is not divisible by {group.name}_size {group.size}")
    local = full // group.size
    return Segment(full, group.rank * local, local)


def split_heads(num_heads: int, head_dim: int, group: TensorParallelGroup, what: str = "heads") -> Segment:
    """Heads split over the group; with more ranks than heads each head is replicated on size/heads ranks
    (KV heads under GQA/MQA), which needs the group size to be a multiple of the head count."""
    size = group.size
    if size <= num_heads:
        if num_heads % size:
            return Segment(num_heads * head_dim, 0, max(num_heads // size, 1) * head_dim,
                           f"{num_heads} {what} cannot be split over {group.name}_size {size} (it must divide them)")
        local_heads = num_heads // size
        return Segment(num_heads * head_dim, group.rank * local_heads * head_dim, local_heads * head_dim)
    if size % num_heads:
        return Segment(num_heads * head_dim, 0, head_dim,
                       f"{num_heads} {what} cannot be replicated over {group.name}_size {size} "
                       f"(it must be a multiple of them)")
    replicas = size // num_heads
    return Segment(num_heads * head_dim, (group.rank // replicas) * head_dim, head_dim)


def local_heads(num_heads: int, group: str) -> int:
    """Heads this rank holds of `num_heads` split (or replicated) over the named group."""
    size = get_tp_group(group).size
    return max(num_heads // size, 1)


def tensor_shape(loaded) -> tuple[int, ...]:
    """The shape of a checkpoint tensor or of a lazy safetensors slice."""
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def take(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """Read rows [start, start + length) along `dim`; from a safetensors slice only those bytes are read."""
    index = (slice(None),) * (dim % len(tensor_shape(loaded))) + (slice(start, start + length),)
    return loaded[index]


class TransposedSlice:
    """A checkpoint tensor stored [in, out] (GPT-2's Conv1D) read as the [out, in] a linear layer holds: indexing
    reads only the indexed columns."""

    def __init__(self, loaded):
        self.loaded = loaded

    def get_shape(self) -> list[int]:
        return list(reversed(tensor_shape(self.loaded)))

    def __getitem__(self, index) -> torch.Tensor:
        items = list(index if isinstance(index, tuple) else (index,)) + [slice(None)] * 2
        return self.loaded[items[1], items[0]].t()


def check_partitions(model: torch.nn.Module) -> None:
    """Raise, naming the layer, the sizes and the TP degree, if any parallel layer of `model` cannot split."""
    for name, module in model.named_modules():
        problem = getattr(module, "partition_problem", None)
        if problem:
            raise SettingsError(f"layer '{name}': {problem}")
        segments = getattr(module, "segments", None)
        if isinstance(segments, list) and module.weight.shape[0] != sum(segment.local for segment in segments):
            raise SettingsError(
                f"layer '{name}' holds a weight of {module.weight.shape[0]} rows, not the "
                f"{sum(segment.local for segment in segments)} this rank's split needs: it is tied to a tensor "
                f"split differently (tie the lm_head only to an embedding with embed_tp_size == lmhead_tp_size)"
            )
    for name, param in model.named_parameters():
        problem = getattr(param, "partition_problem", None)
        if problem:
            raise SettingsError(f"parameter '{name}': {problem}")
