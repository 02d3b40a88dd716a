"""Integer weights in groups along the input dimension: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, kept as they are.

Stored (`recipes-scaffold import-gguf --keep-quantized`), for a weight `<x>` of shape [out, in]:
- 4-bit: `<x>_codes` uint8 [out, in/2] (two codes 0..15 a byte, the lower nibble first along `in`),
  `<x>_scales` and `<x>_mins` float16 [out, in/group]: value = scale · code + min (Q4_1 as it is; Q4_0's
  scale · (code − 8) has min = −8 · scale);
- 8-bit: `<x>_codes` int8 [out, in], `<x>_scales` float16 [out, in/group]: value = scale · code (Q8_0).

Two run-time modes. `dequantize`: any layer reads float weights. `packed`: the rank's linear layers keep their codes
and run them on a CPU kernel for integer groups (`core.quantization.low_bit.IntGroups`, bfloat16 activations).
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import CheckpointError
from core.quantization.base import QuantizationMethod, QuantizedSlice, block_range
from core.quantization.low_bit import IntGroups, int4_groups_fit, linear_layers

CODES, SCALES, MINS = "_codes", "_scales", "_mins"


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] → uint8 [..., in]: each byte's lower nibble, then its upper one."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., in] → [..., in/2], the inverse of `unpack_nibbles`."""
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored codes (packed nibbles when `mins` is given, else int8) → float [out, in]."""
    values = unpack_nibbles(codes) if mins is not None else codes
    group = values.shape[-1] // scales.shape[-1]
    grouped = values.float().unflatten(-1, (-1, group)) * scales.float().unsqueeze(-1)
    if mins is not None:
        grouped = grouped + mins.float().unsqueeze(-1)
    return grouped.flatten(-2).to(dtype)


class IntGroupSlice(QuantizedSlice):
    def __init__(self, name: str, parts: dict, checkpoint, group: int):
        super().__init__(name, parts, checkpoint)
        self.group = group
        self.bits = 4 if "mins" in parts else 8

    def get_shape(self) -> list[int]:
        rows, groups = self.parts["scales"].get_shape()
        return [rows, groups * self.group]

    def part_ranges(self, dim: int, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
        if dim == 0:
            return {role: (0, start, stop) for role in self.parts}
        first, last = block_range(self.name, dim, start, stop, self.get_shape()[1], self.group)
        ranges = {role: (1, first, last) for role in self.parts}
        per_group = self.group // 2 if self.bits == 4 else self.group
        ranges["codes"] = (1, first * per_group, last * per_group)
        return ranges

    def dequantize(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_groups(pieces["codes"], pieces["scales"], pieces.get("mins"), dtype)


class PackedIntGroups(IntGroups):
    """A linear weight filled from stored Q4/Q8 groups."""

    def store(self, parts: dict[str, torch.Tensor]) -> None:
        if "mins" in parts:
            self.set_groups(unpack_nibbles(parts["codes"]), parts["scales"], parts["mins"])
        else:
            self.set_groups(parts["codes"], parts["scales"])


class IntGroupsMethod(QuantizationMethod):
    name = "int_groups"
    weight_modes = ("dequantize", "packed")

    def __init__(self, quantization_config: dict, weight_mode: str, config_file: str):
        super().__init__(quantization_config, weight_mode, config_file)
        group = quantization_config.get("group_size")
        if not isinstance(group, int) or group <= 0 or group % 2:
            raise CheckpointError(f"{config_file}: int_groups group_size must be a positive even integer such as "
                                  f"32, got {group!r}")
        self.group = group

    def quantized_slices(self, tensors: dict, checkpoint) -> dict[str, QuantizedSlice]:
        slices = {}
        for name in sorted(tensors):
            if not name.endswith(CODES):
                if name.endswith((SCALES, MINS)) and f"{name.rsplit('_', 1)[0]}{CODES}" not in tensors:
                    raise CheckpointError(f"int_groups tensor '{name}' has no '{name.rsplit('_', 1)[0]}{CODES}' "
                                          f"beside it")
                continue
            logical = name.removesuffix(CODES)
            parts = {role: tensors.get(f"{logical}_{role}") for role in ("codes", "scales", "mins")}
            if parts["scales"] is None:
                raise CheckpointError(f"int_groups codes '{name}' have no '{logical}{SCALES}' beside them")
            slices[logical] = self._checked(logical, {role: part for role, part in parts.items() if part is not None},
                                            checkpoint)
        return slices

    def _checked(self, name: str, parts: dict, checkpoint) -> IntGroupSlice:
        codes, scales = parts["codes"], parts["scales"]
        rows, groups = scales.get_shape() if len(scales.get_shape()) == 2 else (None, None)
        four_bit = "mins" in parts
        width = groups * self.group // (2 if four_bit else 1) if groups is not None else None
        expected_dtype = torch.uint8 if four_bit else torch.int8
        if rows is None or codes.dtype != expected_dtype or codes.get_shape() != [rows, width]:
            raise CheckpointError(
                f"int_groups codes '{name}{CODES}' are {codes.get_dtype()} {codes.get_shape()}; with scales "
                f"{scales.get_shape()} and group_size {self.group} they must be "
                f"{'uint8' if four_bit else 'int8'} [{rows}, {width}]"
            )
        if four_bit and parts["mins"].get_shape() != scales.get_shape():
            raise CheckpointError(f"int_groups mins '{name}{MINS}' have shape {parts['mins'].get_shape()}, not the "
                                  f"scales' {scales.get_shape()}")
        return IntGroupSlice(name, parts, checkpoint, self.group)

    def pack(self, model: nn.Module, checkpoint) -> None:
        """Linear layers whose stored weight fits the CPU kernel keep their codes; the rest dequantize."""
        if self.weight_mode != "packed":
            return
        for name, layer in linear_layers(model):
            merged_from = getattr(layer.weight, "merged_from", None)
            sources = [f"{name}.weight"] if merged_from is None else [f"{name.rpartition('.')[0]}.{sibling}"
                                                                       for sibling in merged_from]
            stored = [checkpoint.get_slice(source) if source in checkpoint else None for source in sources]
            bits = {slice_.bits if isinstance(slice_, IntGroupSlice) else None for slice_ in stored}
            if len(bits) == 1 and None not in bits and int4_groups_fit(layer.weight.shape, self.group) is None:
                param = layer.weight
                del layer._parameters["weight"]
                layer.weight = PackedIntGroups(param, self.group)
