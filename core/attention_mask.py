"""Additive attention masks over a static cache: [batch, 1, queries, max_len], 0 where allowed, dtype-min where not.

Slot j is visible to the query in slot i when j holds a real token (`attention_mask[b, j] == 1`), j <= i, and —
for sliding-window layers — i - j < window, the same rule as HF's masks. The dtype minimum, not -inf, keeps a
fully masked row (a padding query) finite.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig


def causal_masks(attention_mask: torch.Tensor, query_slots: torch.Tensor, dtype: torch.dtype,
                 sliding_window: int | None = None) -> dict[str, torch.Tensor]:
    """{"full_attention": mask, "sliding_attention": mask (when a window is given)}."""
    key_slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    distance = query_slots[:, None] - key_slots[None, :]
    visible = (attention_mask[:, None, None, :] != 0) & (distance >= 0)[None, None]
    minimum = torch.finfo(dtype).min
    masks = {"full_attention": torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, minimum)}
    if sliding_window is not None:
        in_window = visible & (distance < sliding_window)[None, None]
        masks["sliding_attention"] = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~in_window, minimum
        )
    return masks


def masks_for_model(config: PreTrainedConfig, attention_mask: torch.Tensor, query_slots: torch.Tensor,
                    dtype: torch.dtype):
    """What the model's forward takes as `attention_mask`: a dict keyed by layer type when the config declares
    `layer_types` (HF then uses it as is), else the single mask every layer uses — a sliding-window one when the
    config sets a window (and does not switch it off with `use_sliding_window`), as HF's Mistral does."""
    layer_types = getattr(config, "layer_types", None)
    sliding_window = getattr(config, "sliding_window", None)
    if not layer_types:
        if sliding_window is not None and getattr(config, "use_sliding_window", True):
            return causal_masks(attention_mask, query_slots, dtype, sliding_window)["sliding_attention"]
        return causal_masks(attention_mask, query_slots, dtype)["full_attention"]
    masks = causal_masks(attention_mask, query_slots, dtype,
                         sliding_window if "sliding_attention" in layer_types else None)
    return {layer_type: masks[layer_type] for layer_type in set(layer_types)}
