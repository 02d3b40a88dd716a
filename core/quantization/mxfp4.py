"""MXFP4 (gpt-oss): the experts' weights in 32-element blocks along the input dimension.

Stored: `<x>_blocks` uint8 [experts, out, in/32, 16] (two fp4 e2m1 codes a byte, low nibble first) and
`<x>_scales` uint8 [experts, out, in/32] (e8m0: a power of two, biased by 127). The tensor they stand for is
the experts parameter `<x>` in the [experts, in, out] layout its `x @ W` forward uses (as transformers
dequantizes it). Two run-time modes: `dequantize` once at load, or `packed`: the rank keeps its blocks and
scales and `experts.<x>[e]` dequantizes expert e when a step routes tokens to it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.errors import CheckpointError
from core.quantization.base import PackedWeight, QuantizationMethod, QuantizedSlice, block_range

BLOCK = 32
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127


def block_scales(scales: torch.Tensor) -> torch.Tensor:
    """e8m0 scales (raw bytes or torch's float8_e8m0fnu) as float32 powers of two."""
    if scales.dtype == torch.uint8:
        return torch.exp2(scales.float() - E8M0_BIAS)
    return scales.float()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., rows, groups, 16] and scales [..., rows, groups] → float32 [..., rows, groups * 32]."""
    values = torch.tensor(FP4_E2M1_VALUES, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()
    return (values[codes] * block_scales(scales).unsqueeze(-1)).flatten(-2)


class Mxfp4Slice(QuantizedSlice):
    def get_shape(self) -> list[int]:
        *lead, rows, groups, _ = self.parts["blocks"].get_shape()
        return [*lead, groups * BLOCK, rows]

    def part_ranges(self, dim: int, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
        shape = self.get_shape()
        input_dim, output_dim = len(shape) - 2, len(shape) - 1
        if dim == input_dim:
            first, last = block_range(self.name, dim, start, stop, shape[dim], BLOCK)
            return {"blocks": (input_dim + 1, first, last), "scales": (input_dim + 1, first, last)}
        part_dim = input_dim if dim == output_dim else dim
        return {"blocks": (part_dim, start, stop), "scales": (part_dim, start, stop)}

    def dequantize(self, pieces: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # Expert by expert: the 4-bit codes' index tensor is 16x the blocks' bytes, too much for a whole
        # gpt-oss-120b tensor at once.
        experts = [dequantize_mxfp4(blocks, scales).transpose(-1, -2).to(dtype)
                   for blocks, scales in zip(pieces["blocks"], pieces["scales"])]
        return torch.stack(experts)


class PackedMxfp4(PackedWeight):
    """`experts.<x>[e]` → expert e's [in, out] weight in the compute dtype, dequantized from this rank's blocks."""

    def __init__(self, replaced: nn.Parameter):
        super().__init__(replaced)
        self.register_buffer("blocks", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales", torch.empty(0, dtype=torch.uint8), persistent=False)

    def store(self, parts: dict[str, torch.Tensor]) -> None:
        self.blocks, self.scales = parts["blocks"].contiguous(), parts["scales"].contiguous()

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.local_shape)

    def __getitem__(self, index) -> torch.Tensor:
        # A gather by an index tensor, not `blocks[index]`: a compiled graph then needs no host-side scalar.
        experts = torch.as_tensor(index, device=self.blocks.device)
        rows = experts.reshape(-1)
        weight = dequantize_mxfp4(self.blocks.index_select(0, rows), self.scales.index_select(0, rows))
        weight = weight.to(self.compute_dtype).transpose(-1, -2)
        return weight.reshape(*experts.shape, *weight.shape[1:])


def _route_per_expert(experts: nn.Module) -> None:
    """transformers' experts dispatch (`@use_experts_implementation`) may pick a batched or grouped matmul over
    every expert's whole weight; packed weights run the module's own per-expert loop, which indexes only the
    experts a step routes to. The module gets its own copy of the config so no other module changes."""
    config = getattr(experts, "config", None)
    if getattr(config, "_experts_implementation", "eager") != "eager":
        experts.config = copy.copy(config)
        experts.config._experts_implementation = "eager"


class Mxfp4Method(QuantizationMethod):
    name = "mxfp4"
    weight_modes = ("dequantize", "packed")

    def quantized_slices(self, tensors: dict, checkpoint) -> dict[str, QuantizedSlice]:
        slices = {}
        for name in sorted(tensors):
            if name.endswith("_scales") and f"{name.removesuffix('_scales')}_blocks" not in tensors:
                raise CheckpointError(f"mxfp4 scales '{name}' have no '{name.removesuffix('_scales')}_blocks' beside them")
            if not name.endswith("_blocks"):
                continue
            logical = name.removesuffix("_blocks")
            blocks, scales = tensors[name], tensors.get(f"{logical}_scales")
            if scales is None:
                raise CheckpointError(f"mxfp4 blocks '{name}' have no '{logical}_scales' beside them")
            shape = blocks.get_shape()
            if blocks.dtype != torch.uint8 or len(shape) != 4 or shape[-1] != BLOCK // 2:
                raise CheckpointError(f"mxfp4 blocks '{name}' are {blocks.get_dtype()} {shape}; expected uint8 "
                                      f"[experts, out, in/{BLOCK}, {BLOCK // 2}]")
            if scales.get_shape() != shape[:-1]:
                raise CheckpointError(f"mxfp4 scales '{scales.name}' have shape {scales.get_shape()}, but blocks "
                                      f"'{name}' {shape} need {shape[:-1]}")
            slices[logical] = Mxfp4Slice(logical, {"blocks": blocks, "scales": scales}, checkpoint)
        return slices

    def pack(self, model: nn.Module, checkpoint) -> None:
        if self.weight_mode != "packed":
            return
        for name, param in list(model.named_parameters()):
            if name in checkpoint and isinstance(checkpoint.get_slice(name), Mxfp4Slice):
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                del owner._parameters[leaf]
                setattr(owner, leaf, PackedMxfp4(param))
                _route_per_expert(owner)

    def scale_dtype_adapter(self, model: nn.Module) -> None:
        """The scale bytes become torch's e8m0 dtype (same byte): forward reads them as powers of two."""
        for module in model.modules():
            if isinstance(module, PackedMxfp4) and module.scales.dtype == torch.uint8:
                module.scales = module.scales.view(torch.float8_e8m0fnu)
