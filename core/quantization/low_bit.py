"""Weight-only low-bit linears on CPU: integer codes in groups along the input dimension (`IntGroups`: our AVX-512
BF16 kernel in `core.kernels`, else torch's `_weight_int4pack_mm_for_cpu`) and int8 per output channel (the same
kernel's 8-bit path, one group spanning each row, else `Int8Channels`: torch's `_weight_int8pack_mm`).

A low-bit weight replaces a parallel linear layer's `weight` parameter (after the tensor-parallel split, so a rank
holds only its shard) and is called on the activations: `layer.weight(x)` is `x @ Wᵀ`. The kernels take bfloat16
activations (AVX-512 BF16); an fp32 model's activations are cast for the product and back.

`model_config.weight_quant` quantizes a float checkpoint this way at load; `core.quantization.int_groups` fills the
same groups from a checkpoint that stores them (GGUF Q4_0 / Q4_1 / Q8_0 kept quantized).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from core.errors import SettingsError
from core.kernels import GROUP, cpu_kernels
from core.kernels.layout import eight_bit_layout, four_bit_layout, symmetric_four_bit_layout
from core.layers.linear import RowParallelLinear, SegmentedColumnLinear
from core.quantization.base import PackedWeight
from core.settings import WEIGHT_QUANT, WEIGHT_QUANT_GROUP_SIZES

logger = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16
AVX512_KERNEL, TORCH_INT4_KERNEL = "avx512_bf16", "torch_int4"
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


class IntGroups(LowBitWeight):
    """W = scale · code + min per `group` inputs of each output row: 4-bit codes 0..15 with a min, or 8-bit codes
    −128..127 without one.

    Runs on our AVX-512 BF16 kernel where the CPU has it (`core.kernels`: scales and mins in float16, as GGUF stores
    them; exact products; a weight whose mins are all −8 · scale, llama.cpp's Q4_0, on its symmetric form, which
    reads no mins), else on torch's int4 kernel (scales and zeros in bfloat16; an 8-bit code is split into two 4-bit
    terms, code = 16 · high + low, one kernel call each). `int_groups_as_float` is the weight either one multiplies
    by."""

    def __init__(self, replaced: nn.Parameter, group: int):
        super().__init__(replaced)
        self.group = group
        self.kernel = int_groups_kernel_for(group)
        self.bits = 0
        self.symmetric = False

    def set_groups(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> None:
        """codes [out, in] (0..15 with `mins`, else −128..127), scales and mins [out, in/group]."""
        self.bits = 4 if mins is not None else 8
        if self.kernel == AVX512_KERNEL:
            self.symmetric = mins is not None and torch.equal(mins.to(torch.float16), -8 * scales.to(torch.float16))
            per_block = self.group // GROUP
            scales, mins = (None if part is None else part.repeat_interleave(per_block, dim=-1)
                            for part in (scales, mins))
            if self.symmetric:
                layout = symmetric_four_bit_layout(codes, scales)
            elif mins is not None:
                layout = four_bit_layout(codes, scales, mins)
            else:
                layout = eight_bit_layout(codes, scales)
            self.register_buffer("blocks", layout, persistent=False)
            return
        terms = torch_int4_terms(codes, scales, mins)
        for index, (term_codes, term_scales, zeros) in enumerate(terms):
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(term_codes.to(torch.int32).contiguous(), 1)
            scales_and_zeros = torch.stack((term_scales, zeros), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
            self.register_buffer(f"packed_{index}", packed, persistent=False)
            self.register_buffer(f"scales_and_zeros_{index}", scales_and_zeros, persistent=False)
        self.terms = len(terms)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == AVX512_KERNEL:
            if self.symmetric:
                return torch.ops.recipes_scaffold.int4_symmetric_groups_mm(x, self.blocks)
            if self.bits == 4:
                return torch.ops.recipes_scaffold.int4_groups_mm(x, self.blocks)
            return torch.ops.recipes_scaffold.int8_groups_mm(x, self.blocks)
        output = None
        for index in range(self.terms):
            term = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, getattr(self, f"packed_{index}"), self.group, getattr(self, f"scales_and_zeros_{index}"))
            output = term if output is None else output + term
        return output


def int_groups_kernel_for(group: int) -> str:
    """Which kernel runs integer groups of `group` inputs on this machine."""
    if group % GROUP == 0 and cpu_kernels() is None:
        return AVX512_KERNEL
    return TORCH_INT4_KERNEL


def torch_int4_terms(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> list[tuple]:
    """torch's int4 kernel computes (code − 8) · scale + zero: (codes 0..15, scales, zeros) per kernel call."""
    scales = scales.float()
    if mins is not None:
        return [(codes, scales, mins.float() + 8 * scales)]
    wide = codes.to(torch.int16)
    high, low = wide >> 4, wide & 0x0F  # arithmetic shift: high in -8..7, low in 0..15
    return [(high + 8, 16 * scales, torch.zeros_like(scales)), (low, scales, 8 * scales)]


def int_groups_as_float(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                        group: int) -> torch.Tensor:
    """The float weight [out, in] that `IntGroups` multiplies by on this machine (for references)."""
    if int_groups_kernel_for(group) == AVX512_KERNEL:
        grouped = codes.float().unflatten(-1, (-1, group)) * scales.half().float().unsqueeze(-1)
        if mins is not None:
            grouped = grouped + mins.half().float().unsqueeze(-1)
        return grouped.flatten(-2)
    total = 0
    for term_codes, term_scales, zeros in torch_int4_terms(codes, scales, mins):
        term_scales, zeros = (part.to(KERNEL_DTYPE).float().unsqueeze(-1) for part in (term_scales, zeros))
        total = total + ((term_codes.float().unflatten(-1, (-1, group)) - 8) * term_scales + zeros).flatten(-2)
    return total


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


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group, value = scale · code + min: the group's minimum is code 0 and its
    maximum code 15. Scales and mins are float16 numbers (GGUF Q4_1's precision) before the codes are chosen."""
    grouped = weight.float().unflatten(-1, (-1, group))
    low, high = grouped.amin(-1), grouped.amax(-1)
    mins = low.half().float()
    scales = ((high - mins) / 15).clamp(min=2.0**-24).half().float()
    codes = torch.round((grouped - mins.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).flatten(-2)
    return codes.to(torch.uint8), scales, mins


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric round-to-nearest per output row; the scales are float16 numbers before the codes are chosen."""
    scales = (weight.float().abs().amax(-1) / 127).clamp(min=2.0**-24).half().float()
    codes = torch.round(weight.float() / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"codes": codes, "scales": scales}


def int8_rows_on_groups_kernel(shape: torch.Size) -> bool:
    """Whether an int8 per-row weight runs on the integer-group kernel (one group spanning each row) on this
    machine, rather than torch's int8 kernel."""
    rows, columns = shape
    return (rows % INT4_ROWS_MULTIPLE == 0 and columns % GROUP == 0
            and int_groups_kernel_for(columns) == AVX512_KERNEL)


def int8_as_float(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight the int8 kernel this machine runs multiplies by (for references)."""
    codes, scales = parts["codes"], parts["scales"]
    if int8_rows_on_groups_kernel(codes.shape):
        return int_groups_as_float(codes, scales.unsqueeze(-1), None, codes.shape[-1])
    return codes.float() * scales.to(KERNEL_DTYPE).float().unsqueeze(-1)


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
            layer.weight = IntGroups(weight, group)
            layer.weight.set_groups(*quantize_int4(weight.detach(), group))
        elif int8_rows_on_groups_kernel(weight.shape):
            parts = quantize_int8(weight.detach())
            layer.weight = IntGroups(weight, weight.shape[-1])
            layer.weight.set_groups(parts["codes"], parts["scales"].unsqueeze(-1))
        else:
            layer.weight = Int8Channels(weight)
            layer.weight.store(quantize_int8(weight.detach()))
    return left
