"""One new token per row attending to a static cache, written as reductions that inductor fuses into a few kernels.

At decode, SDPA under torch.compile costs more than the attention itself: transformers repeats every KV head for
its query group (a copy of the whole cache per layer and step), and the fused kernel CUDA picks for a masked
single-query call is tuned for long queries. Here each KV head's query group is scored against its keys without
copies: scores, softmax and the weighted sum are three reductions over at most [batch, kv_heads, group, slots,
head_dim], computed in float32. Registered with transformers as `grouped_decode`; it stands in for `sdpa` only —
the same plain softmax attention — and hands every other call (prompts, boolean masks, position biases) to SDPA.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GROUPED_DECODE = "grouped_decode"
CPU_DECODE = "cpu_decode"
# What a model may pass along that plain attention over the additive mask ignores: the window is in the mask already.
IGNORED_KWARGS = {"sliding_window", "position_ids", "cache_position", "use_cache", "output_attentions"}


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """query [batch, heads, 1, head_dim], key and value [batch, kv_heads, slots, dim], attention_mask additive
    [batch, 1 or heads, 1, >= slots] → ([batch, 1, heads, value dim], None), as transformers' SDPA returns."""
    batch, heads, queries, head_dim = query.shape
    plain = (queries == 1 and attention_mask is not None and attention_mask.dtype != torch.bool and dropout == 0.0
             and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, group, 1, head_dim).float()
    scores = (grouped * key[:, :, None].float()).sum(dim=-1) * scale
    mask = attention_mask[..., :slots].expand(batch, heads, 1, slots).reshape(batch, kv_heads, group, slots)
    probs = torch.softmax(scores + mask.float(), dim=-1)
    output = (probs[..., None] * value[:, :, None].float()).sum(dim=-2)
    output = output.to(query.dtype).reshape(batch, heads, 1, value.shape[-1])
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)


def cpu_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """A decode step's attention on our AVX-512 kernel (core/kernels/decode_attention_avx512.cpp): one call per layer
    where inductor's fused loops took ~75 us at SmolLM2 batch 8 on 2 EPYC cores. Any other call — a prompt, a mask
    of another dtype, sinks, a soft cap, dropout — runs the model's own eager attention, as `eager` would."""
    plain = (query.shape[2] == 1 and attention_mask is not None and dropout == 0.0
             and query.dtype in (torch.float32, torch.bfloat16)
             and key.dtype == value.dtype == attention_mask.dtype == query.dtype
             and all(size % 16 == 0 and size <= 128 for size in (query.shape[-1], value.shape[-1]))
             and all(name in IGNORED_KWARGS or option is None or option is False for name, option in kwargs.items()))
    if not plain:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = torch.ops.recipes_scaffold.decode_attention(query.contiguous(), key, value, attention_mask, scale)
    return output, None


AttentionInterface.register(CPU_DECODE, cpu_decode_attention)
