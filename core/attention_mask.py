"""Additive attention masks over a static cache: [batch, 1, queries, max_len], 0 where allowed, dtype-min where not.

Slot j is visible to the query in slot i when j holds a real token (`attention_mask[b, j] == 1`), j <= i, and —
for sliding-window layers — i - j < window, the same rule as HF's masks. The dtype minimum, not -inf, keeps a
fully masked row (a padding query) finite.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig


def causal_masks(attention_mask: torch.Tensor, query_slots: torch.Tensor, dtype: torch.dtype,
                 sliding_window: int | None = None, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """{"full_attention": mask, "sliding_attention": mask (when a window is given), "chunked_attention": mask (when
    a chunk size is given: Llama 4's local layers see only their own chunk, counted from each row's first real
    token)}."""
    key_slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    distance = query_slots[:, None] - key_slots[None, :]
    visible = (attention_mask[:, None, None, :] != 0) & (distance >= 0)[None, None]
    minimum = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, minimum)

    masks = {"full_attention": additive(visible)}
    if sliding_window is not None:
        masks["sliding_attention"] = additive(visible & (distance < sliding_window)[None, None])
    if chunk_size is not None:
        left_padding = (attention_mask.cumsum(dim=-1) == 0).sum(dim=-1)[:, None, None, None]
        same_chunk = ((query_slots[None, None, :, None] - left_padding) // chunk_size
                      == (key_slots[None, None, None, :] - left_padding) // chunk_size)
        masks["chunked_attention"] = additive(visible & same_chunk)
    return masks


# Layer types whose attention is plain causal: DeepSeek V3.2's indexed (sparse) attention applies its own top-k
# selection on top of the causal mask; Falcon-H1's and Inkling's hybrid layers run attention beside a mixer.
CAUSAL_LAYER_TYPES = {"full_attention": "full_attention", "indexed_attention": "full_attention",
                      "hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}
# Layers with a recurrent state instead of keys and values (Gated DeltaNet, Mamba, LFM2's short convolutions) take
# HF's 2-D padding mask of the new tokens: they zero the padding's inputs so it never reaches their state.
RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "mamba", "recurrent")
# Nemotron-H's feed-forward-only layers mix no tokens: they take no mask.
MIXERLESS_LAYER_TYPES = ("mlp", "moe")


def recurrent_mask(attention_mask: torch.Tensor, query_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, queries]: 1 where the new token is real, 0 where it is padding."""
    return attention_mask[:, query_slots].to(dtype)


def masks_for_model(config: PreTrainedConfig, attention_mask: torch.Tensor, query_slots: torch.Tensor,
                    dtype: torch.dtype):
    """What the model's forward takes as `attention_mask`: a dict keyed by layer type when the config declares
    `layer_types` (HF then uses it as is), else the single mask every layer uses — a sliding-window one when the
    config sets a window (and does not switch it off with `use_sliding_window`), as HF's Mistral does."""
    layer_types = getattr(config, "layer_types", None)
    sliding_window = getattr(config, "sliding_window", None)
    if layer_types and set(layer_types) <= set(RECURRENT_LAYER_TYPES):
        # No layer attends (Mamba, Mamba2): the model takes the padding mask itself, as HF's generate passes it.
        return recurrent_mask(attention_mask, query_slots, dtype)
    if not layer_types:
        if sliding_window is not None and getattr(config, "use_sliding_window", True):
            return causal_masks(attention_mask, query_slots, dtype, sliding_window)["sliding_attention"]
        return causal_masks(attention_mask, query_slots, dtype)["full_attention"]
    kinds = {CAUSAL_LAYER_TYPES.get(layer_type, layer_type) for layer_type in layer_types}
    masks = causal_masks(attention_mask, query_slots, dtype,
                         sliding_window if "sliding_attention" in kinds else None,
                         getattr(config, "attention_chunk_size", None) if "chunked_attention" in kinds else None)
    layer_types = [layer_type for layer_type in layer_types if layer_type not in MIXERLESS_LAYER_TYPES]
    unknown = set(layer_types) - set(masks) - set(CAUSAL_LAYER_TYPES) - set(RECURRENT_LAYER_TYPES)
    if unknown:
        raise ValueError(f"config.layer_types has {sorted(unknown)}; the static-cache masks cover "
                         f"{sorted(set(masks) | set(CAUSAL_LAYER_TYPES) | set(RECURRENT_LAYER_TYPES))}")
    by_type = {layer_type: masks[CAUSAL_LAYER_TYPES.get(layer_type, layer_type)]
               for layer_type in set(layer_types) - set(RECURRENT_LAYER_TYPES)}
    if set(layer_types) & {*RECURRENT_LAYER_TYPES, "hybrid", "hybrid_sliding"}:
        # Hybrid models look their mixers' mask up by HF's own keys, whatever their layer types are called.
        padding = recurrent_mask(attention_mask, query_slots, dtype)
        by_type.update(dict.fromkeys(RECURRENT_LAYER_TYPES, padding), full_attention=masks["full_attention"])
    return by_type
