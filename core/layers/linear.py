"""Tensor-parallel linear layers. Each parameter carries its own `weight_loader(param, loaded[, shard_id])`
that reads only this rank's rows or columns from a checkpoint tensor (a lazy safetensors slice or a tensor).

Column layers split the output features (the result stays split); row layers split the input features, sum
the partial products over the group and add the bias once, after the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import get_tp_group
from core.errors import CheckpointError
from core.layers.partition import Segment, TransposedSlice, split_evenly, split_heads, take, tensor_shape


def local_linear(x: torch.Tensor, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ (+ bias); a low-bit weight (core.quantization.low_bit) is a module that does the product itself."""
    if isinstance(weight, nn.Module):
        output = weight(x)
        return output if bias is None else output + bias
    return F.linear(x, weight, bias)


def load_row_segments(owner: str, param: nn.Parameter, loaded, segments: list[Segment], shard_id: int | None = None,
                      interleaved: bool = False) -> None:
    """Copy this rank's rows of each segment of `loaded` (fused: the segments one after the other; `shard_id`: that
    segment alone; interleaved: rows of two equal segments alternating) into `param`, segment after segment."""
    expected_rows = sum(s.full for s in segments) if shard_id is None else segments[shard_id].full
    rows = tensor_shape(loaded)[0]
    if rows != expected_rows or tensor_shape(loaded)[1:] != tuple(param.shape[1:]):
        raise CheckpointError(
            f"{owner}: checkpoint tensor of shape {list(tensor_shape(loaded))} does not fit "
            f"{expected_rows} output rows x {list(param.shape[1:])}"
        )
    if shard_id is not None:
        offset = sum(s.local for s in segments[:shard_id])
        segment = segments[shard_id]
        param.data[offset : offset + segment.local].copy_(take(loaded, 0, segment.start, segment.local))
    elif interleaved:
        param.data.copy_(take(loaded, 0, 2 * segments[0].start, param.shape[0]))
    else:
        disk_offset, offset = 0, 0
        for segment in segments:
            piece = take(loaded, 0, disk_offset + segment.start, segment.local)
            param.data[offset : offset + segment.local].copy_(piece)
            disk_offset += segment.full
            offset += segment.local


class SegmentedColumnLinear(nn.Linear):
    """A column-parallel linear whose output is one or more segments (q|k|v, gate|up), each split on its own.

    On disk the segments are either fused into one tensor (`shard_id=None`) or stored apart (`shard_id=i`).
    `interleaved` fused tensors alternate rows of two equal segments (gate0, up0, gate1, …): a rank's rows are
    then one contiguous block, kept interleaved in memory as the model's code expects.
    """

    def __init__(self, in_features: int, segments: list[Segment], bias: bool, group: str,
                 interleaved: bool = False, checkpoint_names: list[str] | None = None,
                 dtype: torch.dtype | None = None, checkpoint_transposed: bool = False):
        super().__init__(in_features, sum(segment.local for segment in segments), bias=bias, dtype=dtype)
        self.tp_group = get_tp_group(group)
        self.segments = segments
        self.interleaved = interleaved
        # GPT-2's Conv1D stores its weight [in, out]; the layer holds [out, in] like every linear.
        self.checkpoint_transposed = checkpoint_transposed
        self.partition_problem = next((segment.problem for segment in segments if segment.problem), None)
        for leaf, param in self.named_parameters():
            param.weight_loader = self.weight_loader
            if checkpoint_names is not None:
                # Segment i is stored as its own layer, a sibling of this one: `<parent>.<name_i>.<leaf>`.
                param.merged_from = [f"{name}.{leaf}" for name in checkpoint_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_linear(x, self.weight, self.bias)

    def local_columns(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a tensor laid out like the full output on its last dim (Falcon-H1 scales each
        output section by its own multiplier): the rank's part of each segment, in order."""
        pieces, disk_offset = [], 0
        for segment in self.segments:
            pieces.append(full[..., disk_offset + segment.start : disk_offset + segment.start + segment.local])
            disk_offset += segment.full
        return torch.cat(pieces, dim=-1)

    @property
    def split_sizes(self) -> list[int]:
        """This rank's size of each segment, in order: `output.split(layer.split_sizes, dim=-1)`."""
        return [segment.local for segment in self.segments]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int | None = None) -> None:
        if self.checkpoint_transposed and param is self.weight:
            loaded = TransposedSlice(loaded)
        load_row_segments(type(self).__name__, param, loaded, self.segments, shard_id, self.interleaved)


class ColumnParallelLinear(SegmentedColumnLinear):
    """Output features split over `group`; with `num_heads`, split by whole heads (replicated when the group
    is larger than the head count, as KV heads are under GQA)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: str = "attn_tp",
                 num_heads: int | None = None, dtype: torch.dtype | None = None, checkpoint_transposed: bool = False):
        tp = get_tp_group(group)
        if num_heads is None:
            segment = split_evenly(out_features, tp, "output features")
        else:
            segment = split_heads(num_heads, out_features // num_heads, tp)
        super().__init__(in_features, [segment], bias, group, dtype=dtype, checkpoint_transposed=checkpoint_transposed)


class MergedColumnParallelLinear(SegmentedColumnLinear):
    """Several column outputs in one matmul (q|k|v, gate|up), each split over `group`: evenly, or by whole heads
    where `num_heads` gives the segment's head count.

    checkpoint_names: the segments are separate layers on disk (`q_proj`, `k_proj`, `v_proj`), siblings of this
    one; without it the checkpoint holds this layer's own fused tensor.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = True, group: str = "moe_tp",
                 interleaved: bool = False, num_heads: list[int | None] | None = None,
                 checkpoint_names: list[str] | None = None, dtype: torch.dtype | None = None,
                 checkpoint_transposed: bool = False):
        tp = get_tp_group(group)
        if interleaved and len(set(output_sizes)) != 1:
            raise ValueError(f"interleaved segments must be of equal size, got {output_sizes}")
        heads = num_heads or [None] * len(output_sizes)
        names = [f" of {name}" for name in checkpoint_names] if checkpoint_names else [""] * len(output_sizes)
        segments = [
            split_evenly(size, tp, f"output features{name}") if count is None
            else split_heads(count, size // count, tp, f"heads{name}")
            for size, count, name in zip(output_sizes, heads, names)
        ]
        super().__init__(in_features, segments, bias, group, interleaved, checkpoint_names, dtype,
                         checkpoint_transposed)


class RowParallelLinear(nn.Linear):
    """Input features split over `group` (by whole heads with `num_heads`); partial outputs are summed over
    the group and the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group: str = "attn_tp",
                 num_heads: int | None = None, dtype: torch.dtype | None = None, checkpoint_transposed: bool = False):
        tp = get_tp_group(group)
        if num_heads is None:
            segment = split_evenly(in_features, tp, "input features")
        else:
            segment = split_heads(num_heads, in_features // num_heads, tp)
            if tp.size > num_heads and segment.problem is None:
                segment = Segment(segment.full, 0, segment.local,
                                  f"{num_heads} heads cannot be split over {tp.name}_size {tp.size}")
        super().__init__(segment.local, out_features, bias=bias, dtype=dtype)
        self.checkpoint_transposed = checkpoint_transposed  # GPT-2's Conv1D: [in, out] on disk
        self.tp_group = tp
        self.segment = segment
        self.partition_problem = segment.problem
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if self.checkpoint_transposed:
            loaded = TransposedSlice(loaded)
        expected = (self.out_features, self.segment.full)
        if tensor_shape(loaded) != expected:
            raise CheckpointError(f"RowParallelLinear: checkpoint tensor of shape {list(tensor_shape(loaded))} "
                                  f"does not fit {list(expected)}")
        param.data.copy_(take(loaded, 1, self.segment.start, self.segment.local))

    def bias_loader(self, param: nn.Parameter, loaded) -> None:
        if tensor_shape(loaded) != tuple(param.shape):
            raise CheckpointError(f"RowParallelLinear: bias of shape {list(tensor_shape(loaded))} does not fit "
                                  f"{list(param.shape)}")
        param.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size == 1:
            return local_linear(x, self.weight, self.bias)
        output = self.tp_group.all_reduce(local_linear(x, self.weight))
        return output if self.bias is None else output + self.bias


class ParallelLMHead(ColumnParallelLinear):
    """Vocabulary split over `group`; every rank gets the full logits (gathered)."""

    def __init__(self, in_features: int, vocab_size: int, bias: bool = True, group: str = "lmhead_tp",
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, vocab_size, bias=bias, group=group, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp_group.all_gather(super().forward(x), dim=-1)
