"""What every quantization method provides (one module per method registers itself in `core.quantization`).

A method reads its settings from the checkpoint's `quantization_config`, groups a checkpoint's stored tensors into
`QuantizedSlice`s (a weight seen as the dequantized tensor it stands for, read lazily), and, for a method that
can keep weights packed at run time, swaps parameters for `PackedWeight` modules that dequantize in forward.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from core.errors import CheckpointError, SettingsError


class BlockSplitError(SettingsError):
    """A tensor-parallel slice would cut a quantization block."""


def narrowed_range(index, shape: list[int], name: str) -> tuple[int | None, int, int]:
    """`index` (step-1 slices, as parallel layers take them) as (dim, start, stop) of its one narrowed dimension;
    dim is None when it takes the whole tensor."""
    items = list(index if isinstance(index, tuple) else (index,))
    if len(items) > len(shape) or not all(isinstance(item, slice) and item.step in (None, 1) for item in items):
        raise IndexError(f"{name}: only step-1 slices, at most one per dimension of {len(shape)}, are supported")
    narrowed = []
    for dim, item in enumerate(items):
        start, stop, _ = item.indices(shape[dim])
        if (start, stop) != (0, shape[dim]):
            narrowed.append((dim, start, max(start, stop)))
    if len(narrowed) > 1:
        raise IndexError(f"{name}: only one dimension can be narrowed at a time, got {index}")
    return narrowed[0] if narrowed else (None, 0, 0)


def block_range(name: str, dim: int, start: int, stop: int, size: int, block: int) -> tuple[int, int]:
    """The blocks that rows [start, stop) of a `size`-long dimension cover; the range must not cut a block
    (the last block of a dimension may be partial, and a range may end there)."""
    if start % block or (stop % block and stop != size):
        raise BlockSplitError(
            f"rows [{start}, {stop}) of dimension {dim} of '{name}' (size {size}) cut its {block}-wide quantization "
            f"blocks"
        )
    return start // block, math.ceil(stop / block)


class QuantizedSlice:
    """A stored-quantized checkpoint tensor seen as the dequantized tensor it stands for.

    `parts` maps a role ("weight", "scale", "blocks", …) to the lazily read stored tensor. Indexing reads only
    the stored parts under the requested range and dequantizes them (float32); how the checkpoint is being
    read (dequantize, collect stored pieces, or only check the range) is the `QuantizedCheckpoint`'s mode.
    """

    def __init__(self, name: str, parts: dict[str, Any], checkpoint):
        self.name, self.parts, self.checkpoint = name, parts, checkpoint

    def get_shape(self) -> list[int]:
        raise NotImplementedError

    def part_ranges(self, dim: int, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
        """For logical rows [start, stop) of `dim`: each part's (dim, start, stop); raises BlockSplitError."""
        raise NotImplementedError

    def dequantize(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index) -> torch.Tensor:
        shape = self.get_shape()
        dim, start, stop = narrowed_range(index, shape, self.name)
        ranges = {} if dim is None else self.part_ranges(dim, start, stop)
        out_shape = list(shape)
        if dim is not None:
            out_shape[dim] = stop - start
        return self.checkpoint.read(self, ranges, out_shape)

    def read_parts(self, ranges: dict[str, tuple[int, int, int]]) -> dict[str, torch.Tensor]:
        pieces = {}
        for role, part in self.parts.items():
            if role in ranges:
                part_dim, start, stop = ranges[role]
                index = (slice(None),) * part_dim + (slice(start, stop),)
                pieces[role] = part[index]
            else:
                pieces[role] = part[:]
        return pieces


class PackedWeight(nn.Module):
    """A parameter kept in its stored quantized form; `self.<name>[i]` dequantizes only what it indexes.

    Loading (core.weights) runs the replaced parameter's own `weight_loader` against a shape-only copy to
    learn which rows this rank owns, collects the stored pieces of exactly those rows, and `store`s them.
    """

    def __init__(self, replaced: nn.Parameter):
        super().__init__()
        self.compute_dtype = replaced.dtype
        self.local_shape = tuple(replaced.shape)
        self.replaced_loader = getattr(replaced, "weight_loader", None)
        if hasattr(replaced, "merged_from"):
            self.merged_from = replaced.merged_from

    def store(self, parts: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def packed_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers(recurse=False))

    def dequantized_numel(self) -> int:
        return math.prod(self.local_shape)


def join_pieces(recorded: dict[str, list[tuple[int | None, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The stored pieces a rank read of each part, joined in reading order along the dimension they were cut."""
    joined = {}
    for role, pieces in recorded.items():
        dims = {dim for dim, _ in pieces}
        if len(pieces) == 1:
            joined[role] = pieces[0][1]
        elif len(dims) == 1 and None not in dims:
            joined[role] = torch.cat([piece for _, piece in pieces], dim=dims.pop())
        else:
            raise CheckpointError(f"part '{role}' was read in pieces cut along different dimensions {sorted(dims)}")
    return joined


class QuantizationMethod:
    """One quantization method: parse its config, recognise its stored tensors, keep or dequantize them."""

    name: ClassVar[str]
    weight_modes: ClassVar[tuple[str, ...]] = ("dequantize",)

    def __init__(self, quantization_config: dict[str, Any], weight_mode: str, config_file: str):
        if weight_mode not in self.weight_modes:
            raise SettingsError(
                f"model_config.quant_weight_mode '{weight_mode}' is not available for {self.name} checkpoints; "
                f"choose {' or '.join(self.weight_modes)}"
            )
        self.config, self.weight_mode, self.config_file = quantization_config, weight_mode, config_file

    def quantized_slices(self, tensors: dict[str, Any], checkpoint) -> dict[str, QuantizedSlice]:
        """The stored tensors this method reads, grouped by the logical tensor each group stands for."""
        raise NotImplementedError

    def pack(self, model: nn.Module, checkpoint) -> None:
        """In `packed` mode, swap each parameter the checkpoint stores quantized for a PackedWeight."""

    def scale_dtype_adapter(self, model: nn.Module) -> None:
        """Give kept scales the dtype forward computes with (nothing is kept in `dequantize` mode)."""
