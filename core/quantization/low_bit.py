"""Weight-only low-bit linears on CPU, through torch's own kernels: int4 in groups along the input dimension
(`_weight_int4pack_mm_for_cpu`) and int8 per output channel (`_weight_int8pack_mm`).

A low-bit weight replaces a parallel linear layer's `weight` parameter (after the tensor-parallel split, so a rank
holds only its shard) and is called on the activations: `layer.weight(x)` is `x @ Wᵀ`. Both kernels are fast with
bfloat16 activations (AVX-512 BF16); an fp32 model's activations are cast for the product and back.

`model_config.weight_quant` quantizes a float checkpoint this way at load; `core.quantization.int_groups` fills the
same int4 layout from a checkpoint that stores its groups (GGUF Q4_0 / Q4_1 / Q8_0 kept quantized).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from core.errors import SettingsError
from core.layers.linear import RowParallelLinear, SegmentedColumnLinear
from core.quantization.base import PackedWeight
from core.settings import WEIGHT_QUANT, WEIGHT_QUANT_GROUP_SIZES

logger = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16
INT4_ROWS_MULTIPLE = 16


def int4_groups_fit(shape: torch.Size, group: int) -> str | None:
    """Why a [out, in] weight cannot run on the int4 CPU kernel with `group`, or None when it can."""
    rows, columns = shape
    if group not in WEIGHT_QUANT_GROUP_SIZES:
        return f"group size {group} is not one of {', '.join(map(str, WEIGHT_QUANT_GROUP_SIZES))}"
    if rows % INT4_ROWS_MULTIPLE:
        return f"{rows} output rows are not a multiple of {INT4_ROWS_MULTIPLE}"
    if columns % group:
        return f"{columns} input features are not a multiple of the group size {group}"
    return None


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The model's parallel linear layers (LM head included), by name."""
    for name, module in model.named_modules():
        if isinstance(module, (SegmentedColumnLinear, RowParallelLinear)):
            yield name, module


class LowBitWeight(PackedWeight):
    """A linear weight the layer calls instead of multiplying by it; `shape` stays the float weight's."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.local_shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
        return self.matmul(flat).to(x.dtype).reshape(*x.shape[:-1], self.local_shape[0])


class Int4Groups(LowBitWeight):
    """W = Σ over one or more terms of (code − 8) · scale + zero, per `group` inputs of each output row; each term
    is one call of the int4 kernel (an 8-bit code is two 4-bit terms)."""

    def __init__(self, replaced: nn.Parameter, group: int):
        super().__init__(replaced)
        self.group = group
        self.terms = 0

    def set_groups(self, terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """terms: (codes 0..15 [out, in], scales [out, in/group], zeros [out, in/group]) each."""
        for index, (codes, scales, zeros) in enumerate(terms):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
            self.register_buffer(f"packed_{index}", packed, persistent=False)
            self.register_buffer(f"scales_and_zeros_{index}", scales_and_zeros, persistent=False)
        self.terms = len(terms)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        output = None
        for index in range(self.terms):
            term = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, getattr(self, f"packed_{index}"), self.group, getattr(self, f"scales_and_zeros_{index}"))
            output = term if output is None else output + term
        return output


class Int8Channels(LowBitWeight):
    """W = code · scale, one scale per output row."""

    def __init__(self, replaced: nn.Parameter):
        super().__init__(replaced)
        self.register_buffer("codes", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(0, dtype=KERNEL_DTYPE), persistent=False)

    def store(self, parts: dict[str, torch.Tensor]) -> None:
        self.codes, self.scales = parts["codes"].contiguous(), parts["scales"].to(KERNEL_DTYPE)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.codes, self.scales)


def quantize_int4(weight: torch.Tensor, group: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Asymmetric round-to-nearest per group: the group's minimum is code 0 and its maximum code 15."""
    grouped = weight.float().unflatten(-1, (-1, group))
    low, high = grouped.amin(-1), grouped.amax(-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((grouped - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).flatten(-2)
    return [(codes, scales, low + 8 * scales)]


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric round-to-nearest per output row."""
    scales = (weight.float().abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(weight.float() / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"codes": codes, "scales": scales}


def int4_terms_as_float(terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group: int) -> torch.Tensor:
    """The float weight the int4 kernel multiplies by (scales and zeros rounded to its bfloat16), for references."""
    total = 0
    for codes, scales, zeros in terms:
        scales, zeros = (part.to(KERNEL_DTYPE).float().unsqueeze(-1) for part in (scales, zeros))
        total = total + ((codes.float().unflatten(-1, (-1, group)) - 8) * scales + zeros).flatten(-2)
    return total


def int8_as_float(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return parts["codes"].float() * parts["scales"].to(KERNEL_DTYPE).float().unsqueeze(-1)


def quantize_linears(model: nn.Module, scheme: str, group: int) -> dict[str, str]:
    """Replace each float parallel linear's weight by its `scheme` form; returns {layer: why it stayed float}."""
    if scheme not in WEIGHT_QUANT:
        raise SettingsError(f"model_config.weight_quant '{scheme}' is not one of {', '.join(WEIGHT_QUANT)}")
    left: dict[str, str] = {}
    if scheme == "none":
        return left
    for name, layer in linear_layers(model):
        weight = layer.weight
        if not isinstance(weight, nn.Parameter):
            continue
        problem = int4_groups_fit(weight.shape, group) if scheme == "int4" else None
        if problem is not None:
            left[name] = problem
            continue
        del layer._parameters["weight"]
        if scheme == "int4":
            layer.weight = Int4Groups(weight, group)
            layer.weight.set_groups(quantize_int4(weight.detach(), group))
        else:
            layer.weight = Int8Channels(weight)
            layer.weight.store(quantize_int8(weight.detach()))
    return left
