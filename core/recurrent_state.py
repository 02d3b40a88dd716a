"""Conv and recurrent states of linear-attention and state-space layers, beside the static KV buffers.

Gated DeltaNet, Mamba, Mamba2 and short-convolution layers carry, instead of keys and values, a fixed-size state
per layer: the last `conv_kernel_size` inputs of their causal convolution and a recurrent (SSM / delta-rule)
matrix. transformers' layers reach them through the cache interface HF's own caches implement
(`get_conv_state`, `update_conv_state`, `get_recurrent_state`, `update_recurrent_state`, `is_recording_past`);
this implements it over buffers that, like the KV buffers, are allocated once, shaped by the first (eager) write
and updated in place so compiled graphs and CUDA graphs keep their addresses.

A state is a running summary, not slots a mask can hide: each new prompt batch must start from nothing.
`begin_prompt()` (the runner calls it before every prefill forward, the eager allocation pass of graph modes
included) zeroes the buffers and makes the next prefill ignore them, so nothing is ever advanced twice.
"""

from __future__ import annotations

import torch

StateKey = tuple[int, int]  # (layer_idx, state_idx): a layer may keep several states (Zamba2, Kimi-Linear)


class RecurrentStates:
    """Mixed into the static cache; `batch_size` (rows to allocate, or None for the first write's) is the cache's."""

    batch_size: int | None

    def _init_recurrent_states(self) -> None:
        self.conv_states: dict[StateKey, torch.Tensor] = {}
        self.recurrent_states: dict[StateKey, torch.Tensor] = {}
        # Which states this prompt's prefill has written: until then a layer sees no previous state.
        self.has_previous_state: dict[StateKey, bool] = {}

    @property
    def has_recurrent_states(self) -> bool:
        return bool(self.conv_states or self.recurrent_states)

    def begin_prompt(self) -> None:
        """A new prompt batch: every layer starts from a zero state."""
        with torch.inference_mode():  # the buffers were made in the runner's inference mode
            for buffer in (*self.conv_states.values(), *self.recurrent_states.values()):
                buffer.zero_()
        self.has_previous_state = dict.fromkeys(self.has_previous_state, False)

    def is_recording_past(self, layer_idx: int) -> bool:
        """HF's speculative-decoding rollback keeps past conv inputs; a static cache never does."""
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        key = (layer_idx, state_idx)
        return self.conv_states[key] if self.has_previous_state.get(key) else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        key = (layer_idx, state_idx)
        return self.recurrent_states.get(key) if self.has_previous_state.get(key) else None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """Keep the last kernel-width inputs [batch, channels, kernel]; return what the convolution must see: the
        new inputs after the previous state (decode), or the prompt's inputs left-padded to the kernel width."""
        key = (layer_idx, state_idx)
        buffer = self._conv_buffer(conv_states, key, conv_kernel_size)
        if self.has_previous_state.get(key):
            full = torch.cat([buffer.to(conv_states.dtype), conv_states], dim=-1)
        else:
            full = self._left_padded(conv_states, buffer.shape[-1])
            self.has_previous_state[key] = True
        buffer.copy_(full[..., -buffer.shape[-1]:])
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        key = (layer_idx, state_idx)
        buffer = self._recurrent_buffer(recurrent_states, key)
        buffer.copy_(recurrent_states)
        self.has_previous_state[key] = True
        return buffer

    @staticmethod
    def _left_padded(conv_states: torch.Tensor, width: int) -> torch.Tensor:
        missing = width - conv_states.shape[-1]
        return torch.nn.functional.pad(conv_states, (missing, 0)) if missing > 0 else conv_states

    def _conv_buffer(self, conv_states: torch.Tensor, key: StateKey, kernel_size: int | None) -> torch.Tensor:
        """The layer's [rows, channels, kernel] conv buffer, allocated at its first write."""
        if key not in self.conv_states:
            width = kernel_size or conv_states.shape[-1]
            self.conv_states[key] = self._allocate_state(conv_states, (*conv_states.shape[:-1], width), key[0])
        return self.conv_states[key]

    def _recurrent_buffer(self, recurrent_states: torch.Tensor, key: StateKey) -> torch.Tensor:
        if key not in self.recurrent_states:
            self.recurrent_states[key] = self._allocate_state(recurrent_states, recurrent_states.shape, key[0])
        return self.recurrent_states[key]

    def _allocate_state(self, like: torch.Tensor, shape, layer_idx: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError(f"layer {layer_idx}'s recurrent state is first written inside a compiled graph; its "
                               f"buffers take their shape from an eager step, so run one eager forward first")
        shape = list(shape)
        if self.batch_size is not None:
            shape[0] = self.batch_size
        buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        torch._dynamo.mark_static_address(buffer)
        return buffer


class RecurrentStatesRow:
    """The states as one row of a running batch sees them while its prompt is prefilled alone (serving): the
    prefill starts from nothing and writes that row of the batch's buffers."""

    def __init__(self, states: RecurrentStates, index: int):
        self.states, self.rows = states, slice(index, index + 1)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> None:
        return None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        states, key = self.states, (layer_idx, state_idx)
        buffer = states._conv_buffer(conv_states, key, conv_kernel_size)
        full = RecurrentStates._left_padded(conv_states, buffer.shape[-1])
        buffer[self.rows].copy_(full[..., -buffer.shape[-1]:])
        states.has_previous_state[key] = True
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        states, key = self.states, (layer_idx, state_idx)
        buffer = states._recurrent_buffer(recurrent_states, key)[self.rows]
        buffer.copy_(recurrent_states)
        states.has_previous_state[key] = True
        return buffer
