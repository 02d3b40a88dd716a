"""Block-wise FP8 (DeepSeek-V3/R1, Qwen3-*-FP8 and most `quant_method: fp8` checkpoints).

Stored: `<x>.weight` float8_e4m3fn [..., rows, cols] and `<x>.weight_scale_inv` [..., ceil(rows/bn),
ceil(cols/bk)] for `weight_block_size: [bn, bk]`; weight = fp8 value x scale of its block. Edge blocks may be
partial (DeepSeek's kv_a_proj_with_mqa has 576 rows in 128-row blocks). Weights are dequantized at load into
the compute dtype; a tensor-parallel rank reads only its rows or columns of the weight and of the scale grid.
"""

from __future__ import annotations

import math

import torch

from core.errors import CheckpointError
from core.quantization.base import QuantizationMethod, QuantizedSlice, block_range

SCALE_SUFFIX = "_scale_inv"
ACTIVATION_SCHEMES = ("dynamic",)


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [..., rows, cols] x its block's scale; scale [..., ceil(rows/bn), ceil(cols/bk)]."""
    rows, cols = weight.shape[-2:]
    if scale.dtype == torch.uint8:  # e8m0 scale bytes (ue8m0 checkpoints): 2 ** (byte - 127)
        scale = torch.exp2(scale.float() - 127)
    expanded = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * expanded).to(dtype)


class Fp8BlockSlice(QuantizedSlice):
    """block None: one scale for the whole tensor (per-tensor FP8), shared by every rank's slice."""

    def __init__(self, name: str, parts: dict, checkpoint, block: tuple[int, int] | None):
        super().__init__(name, parts, checkpoint)
        self.block = block

    def get_shape(self) -> list[int]:
        return self.parts["weight"].get_shape()

    def part_ranges(self, dim: int, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
        shape = self.get_shape()
        block_dim = dim - (len(shape) - 2)
        if self.block is None:
            return {"weight": (dim, start, stop)}
        if block_dim < 0:  # a leading (expert) dimension: weight and scale share it
            return {"weight": (dim, start, stop), "scale": (dim, start, stop)}
        first, last = block_range(self.name, dim, start, stop, shape[dim], self.block[block_dim])
        return {"weight": (dim, start, stop), "scale": (dim, first, last)}

    def dequantize(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.block is None:
            return (pieces["weight"].float() * pieces["scale"].float().reshape(())).to(dtype)
        return dequantize_fp8_blocks(pieces["weight"], pieces["scale"], self.block, dtype)


class Fp8Method(QuantizationMethod):
    name = "fp8"

    def __init__(self, quantization_config: dict, weight_mode: str, config_file: str):
        super().__init__(quantization_config, weight_mode, config_file)
        scheme = quantization_config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise CheckpointError(
                f"{config_file}: fp8 activation_scheme '{scheme}' is not supported (supported: "
                f"{', '.join(ACTIVATION_SCHEMES)}); its static activation scales would be ignored"
            )
        block = quantization_config.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(size, int) and size > 0 for size in block)):
            raise CheckpointError(f"{config_file}: fp8 weight_block_size must be two positive integers such as "
                                  f"[128, 128], got {block!r}")
        self.block = tuple(block) if block is not None else None

    def quantized_slices(self, tensors: dict, checkpoint) -> dict[str, QuantizedSlice]:
        slices = {}
        for name in sorted(tensors):
            stored = tensors[name]
            if name.endswith(SCALE_SUFFIX):
                weight_name = name.removesuffix(SCALE_SUFFIX)
                if weight_name not in tensors:
                    raise CheckpointError(f"scale tensor '{name}' has no weight '{weight_name}' beside it")
                slices[weight_name] = self._slice(weight_name, tensors[weight_name], stored, checkpoint)
            elif stored.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and f"{name}{SCALE_SUFFIX}" not in tensors:
                raise CheckpointError(f"fp8 tensor '{name}' has no scale '{name}{SCALE_SUFFIX}' beside it")
        return slices

    def _slice(self, name: str, weight, scale, checkpoint) -> Fp8BlockSlice:
        shape = weight.get_shape()
        if len(shape) < 2 or weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"tensor '{name}' has a scale but is {weight.get_dtype()} of shape {shape}, not a "
                                  f"float8 matrix")
        scale_shape = scale.get_shape()
        if self.block is None:
            if math.prod(scale_shape) != 1:
                raise CheckpointError(f"scale tensor '{scale.name}' has shape {scale_shape}, but without "
                                      f"weight_block_size the weight '{name}' has one scale")
            return Fp8BlockSlice(name, {"weight": weight, "scale": scale}, checkpoint, None)
        expected = [*shape[:-2], math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1])]
        if scale_shape != expected:
            raise CheckpointError(
                f"scale tensor '{scale.name}' has shape {scale_shape}, but weight '{name}' {shape} in "
                f"{list(self.block)} blocks needs {expected}"
            )
        return Fp8BlockSlice(name, {"weight": weight, "scale": scale}, checkpoint, self.block)
