"""A static, preallocated KV cache behind the HF cache interface (`update`, `get_seq_length`, …).

Every layer holds [batch, kv_heads_per_rank, max_len, head_dim] keys and values, allocated once. The runner
says which slots this step writes (`write_slots`, a tensor, so one compiled decode graph serves every step);
attention masks, not the buffers, decide what each query sees (causal, sliding window, padding), so sliding-window
layers keep full-length buffers too: simple, static shapes, at the cost of memory beyond the window.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from core.layers import local_heads


class StaticKVCache:
    is_compileable = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, value_head_dim: int | None = None):
        self.max_len = max_len
        self.keys = [torch.zeros(batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.zeros(batch_size, num_kv_heads, max_len, value_head_dim or head_dim, dtype=dtype,
                                   device=device) for _ in range(num_layers)]
        for tensor in (*self.keys, *self.values):
            # A fixed address lets CUDA graphs replay over the in-place updates.
            torch._dynamo.mark_static_address(tensor)
        self.write_slots = torch.zeros(1, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, config: PreTrainedConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device) -> "StaticKVCache":
        """Sized from the model config, with this rank's share of the KV heads under attention TP."""
        num_heads = config.num_attention_heads
        if getattr(config, "kv_lora_rank", None):
            # Multi-head latent attention caches the compressed latents, one "head" shared by every query head
            # (and whole on every rank): the kv latent as the key, the rotated key part as the value.
            return cls(config.num_hidden_layers, batch_size, 1, config.kv_lora_rank, max_len, dtype, device,
                       value_head_dim=config.qk_rope_head_dim)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(config.num_hidden_layers, batch_size, local_heads(num_kv_heads, "attn_tp"), head_dim, max_len,
                   dtype, device)

    def set_write_slots(self, slots: torch.Tensor) -> None:
        """The cache slots the next forward's tokens go to (the same for every row of a left-padded batch)."""
        self.write_slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.write_slots, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.write_slots, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_len, 0

    def __len__(self) -> int:
        return len(self.keys)
