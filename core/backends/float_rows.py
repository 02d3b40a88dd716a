"""Float linear weights multiplied by our AVX-512 kernel (`core/kernels/float_rows_avx512.cpp`) in CPU graphs.

Decode multiplies every weight by a few activation rows, and the weights' bytes bound its time. torch's own fast
path on CPU (inductor's C++ GEMM template over weights frozen into the graph and prepacked) leaves the graph out of
inductor's FX-graph cache, so each process lowers it again. The kernel reads weights laid out for it once, before the
first compile, and they stay graph inputs: a compiled step is cached like the low-bit ones, and each distinct decoder
layer is compiled once.
A prompt's many rows go through the kernel too, eight at a time over each run of weights held in cache: on a 2-core
AMD EPYC without AMX it beat torch's GEMM (oneDNN) on SmolLM2's shapes up to 256 rows, bf16 and fp32.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from core.kernels import ROWS
from core.kernels.layout import FLOAT_STEP, float_rows_layout
from core.quantization.low_bit import linear_layers


def float_rows_fit(weight: torch.Tensor) -> str | None:
    """Why the kernel cannot multiply by `weight`, or None when it can."""
    if weight.dtype not in FLOAT_STEP:
        return f"{weight.dtype} weights (the kernel takes {' or '.join(map(str, FLOAT_STEP))})"
    rows, columns = weight.shape
    if rows % ROWS:
        return f"{rows} output rows are not a multiple of {ROWS}"
    if columns % FLOAT_STEP[weight.dtype]:
        return f"{columns} input features are not a multiple of {FLOAT_STEP[weight.dtype]}"
    return None


class FloatRowsWeight(nn.Module):
    """A float linear weight laid out for the kernel, which the layer calls instead of multiplying by it
    (core.layers.linear.local_linear)."""

    def __init__(self, weight: torch.Tensor, in_place: bool):
        """in_place: lay the weight out in its own memory, which nothing else may then read; else in a new
        tensor."""
        super().__init__()
        self.local_shape = tuple(weight.shape)
        laid_out = float_rows_layout(weight.detach())
        if in_place:
            laid_out = weight.detach().view(-1).copy_(laid_out)
        self.register_buffer("laid_out", laid_out, persistent=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.local_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.laid_out.dtype).contiguous()
        product = torch.ops.recipes_scaffold.float_rows_mm(flat, self.laid_out)
        return product.to(x.dtype).reshape(*x.shape[:-1], self.local_shape[0])


def float_linears_on_kernel(model: nn.Module) -> dict[str, str]:
    """Lay each float parallel linear's weight out for the kernel; returns {layer: why it kept torch's product}. A
    weight is laid out in its own memory unless another module holds it too (an embedding tied to the LM head),
    which keeps it as it is beside the laid-out copy."""
    holders = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    kept = {}
    for name, layer in linear_layers(model):
        weight = layer.weight
        if not isinstance(weight, nn.Parameter):
            continue
        problem = float_rows_fit(weight)
        if problem is not None:
            kept[name] = problem
            continue
        shared = holders[id(weight)] > 1 or not weight.is_contiguous()
        del layer._parameters["weight"]
        layer.weight = FloatRowsWeight(weight, in_place=not shared)
    return kept
