"""A static, preallocated KV cache behind the HF cache interface (`update`, `get_seq_length`, …).

Every layer holds [batch, kv_heads_per_rank, max_len, head_dim] keys and values, allocated once, at the layer's
first write and shaped like what it writes: the model, not the config, says how many KV heads a rank holds and how
wide keys and values are (Falcon's single shared head, DeepSeek's cached latents, heads replicated under TP). That
first write must happen eagerly, outside any compiled graph: graph modes run one eager prefill per new cache.

The runner says which slots this step writes (`write_slots`, a tensor, so one compiled decode graph serves every
step); attention masks, not the buffers, decide what each query sees (causal, sliding window, padding), so
sliding-window layers keep full-length buffers too: simple, static shapes, at the cost of memory beyond the window.
Linear-attention and state-space layers keep their conv and recurrent states beside (core.recurrent_state).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from core.recurrent_state import RecurrentStates, RecurrentStatesRow


class StaticKVCache(RecurrentStates):
    is_compileable = True

    def __init__(self, num_layers: int, max_len: int, device: torch.device, batch_size: int | None = None):
        """batch_size: the rows to allocate, when the first write may come from one row (`row()`); None takes
        the first write's."""
        self.max_len, self.batch_size = max_len, batch_size
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.indexer_keys: list[torch.Tensor | None] = [None] * num_layers
        self.write_slots = torch.zeros(1, dtype=torch.long, device=device)
        self._init_recurrent_states()

    @classmethod
    def for_model(cls, config: PreTrainedConfig, max_len: int, device: torch.device,
                  batch_size: int | None = None) -> "StaticKVCache":
        # A composite model (BLT, speech-to-text) counts its decoder's layers in its text config.
        return cls(config.get_text_config(decoder=True).num_hidden_layers, max_len, device, batch_size)

    def row(self, index: int) -> "CacheRow":
        """The cache as one row (batch 1) sees it: a prompt prefilled alone into row `index` of a running batch."""
        return CacheRow(self, index)

    def shift_slots(self, shift: int) -> None:
        """Move every row's contents `shift` slots towards slot 0 (in place: the buffers keep their addresses)."""
        for buffers, slot_dim in ((self.keys, 2), (self.values, 2), (self.indexer_keys, 1)):
            for buffer in buffers:
                if buffer is not None:
                    buffer.copy_(torch.roll(buffer, -shift, dims=slot_dim))

    @property
    def allocated(self) -> bool:
        return any(keys is not None for keys in self.keys) or self.has_recurrent_states

    def set_write_slots(self, slots: torch.Tensor) -> None:
        """The cache slots the next forward's tokens go to (the same for every row of a left-padded batch)."""
        self.write_slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values into their slots. What else a release passes (5.23's positional
        `cache_kwargs`, 5.24's `kwargs=`: RoPE angles and cache positions for caches that need them) is not needed:
        the slots come from `write_slots`."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = self._allocate_like(key_states, layer_idx)
            self.values[layer_idx] = self._allocate_like(value_states, layer_idx)
        self.keys[layer_idx].index_copy_(2, self.write_slots, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.write_slots, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def update_indexer(self, indexer_key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """DeepSeek V3.2's sparse-attention indexer keys, [batch, tokens, dim] → the layer's [batch, max_len, dim]."""
        if self.indexer_keys[layer_idx] is None:
            self.indexer_keys[layer_idx] = self._allocate_like(indexer_key_states, layer_idx, slot_dim=1)
        self.indexer_keys[layer_idx].index_copy_(1, self.write_slots, indexer_key_states)
        return self.indexer_keys[layer_idx]

    def _allocate_like(self, states: torch.Tensor, layer_idx: int, slot_dim: int = 2) -> torch.Tensor:
        """A zero buffer shaped like `states` with max_len slots on `slot_dim`."""
        if torch.compiler.is_compiling():
            raise RuntimeError(f"KV cache layer {layer_idx} is first written inside a compiled graph; its buffers "
                               f"take their shape from an eager step, so run one eager forward on a new cache first")
        shape = list(states.shape)
        shape[slot_dim] = self.max_len
        if self.batch_size is not None:
            shape[0] = self.batch_size
        buffer = torch.zeros(shape, dtype=states.dtype, device=states.device)
        # A fixed address lets CUDA graphs replay over the in-place updates.
        torch._dynamo.mark_static_address(buffer)
        return buffer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The slots before this step's: what HF calls the cached length (BART-style decoders count their learned
        positions from it, padding included, as HF does). A compiled graph cannot read it from the slot tensor
        without a host sync, so it sees the capacity instead: ports whose forward takes `position_ids` (every
        decoder-only family) never ask."""
        if torch.compiler.is_compiling():
            return self.max_len
        return int(self.write_slots[0])

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_len, 0

    def __len__(self) -> int:
        return len(self.keys)


class CacheRow(StaticKVCache):
    """Row `index` of a StaticKVCache as a batch-1 cache: writes land in that row's slots, reads return its row."""

    def __init__(self, cache: StaticKVCache, index: int):
        self.cache, self.index = cache, index
        self.max_len, self.batch_size = cache.max_len, cache.batch_size
        self.write_slots = cache.write_slots
        self.row_states = RecurrentStatesRow(cache, index)

    def begin_prompt(self) -> None:
        """A row's prefill never reads the batch's states (RecurrentStatesRow), so there is nothing to reset."""

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return self.row_states.get_conv_state(layer_idx, state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return self.row_states.get_recurrent_state(layer_idx, state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        return self.row_states.update_conv_state(conv_states, layer_idx, state_idx, conv_kernel_size)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        return self.row_states.update_recurrent_state(recurrent_states, layer_idx, state_idx)

    @property
    def allocated(self) -> bool:
        return self.cache.allocated

    def set_write_slots(self, slots: torch.Tensor) -> None:
        self.write_slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        cache, rows = self.cache, slice(self.index, self.index + 1)
        if cache.keys[layer_idx] is None:
            cache.keys[layer_idx] = cache._allocate_like(key_states, layer_idx)
            cache.values[layer_idx] = cache._allocate_like(value_states, layer_idx)
        keys, values = cache.keys[layer_idx][rows], cache.values[layer_idx][rows]
        keys.index_copy_(2, self.write_slots, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_slots, value_states.to(values.dtype))
        return keys, values

    def update_indexer(self, indexer_key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        cache = self.cache
        if cache.indexer_keys[layer_idx] is None:
            cache.indexer_keys[layer_idx] = cache._allocate_like(indexer_key_states, layer_idx, slot_dim=1)
        keys = cache.indexer_keys[layer_idx][self.index : self.index + 1]
        keys.index_copy_(1, self.write_slots, indexer_key_states)
        return keys

    def __len__(self) -> int:
        return len(self.cache)
