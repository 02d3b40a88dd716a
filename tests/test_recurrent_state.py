"""Conv and recurrent states of linear-attention / state-space layers in the static cache: what a layer sees on
prefill and decode, a new prompt starting from nothing, and a serving row's prefill writing only its row."""

import torch

from core.kv_cache import StaticKVCache

CHANNELS, KERNEL = 3, 4


def _conv_inputs(batch: int, tokens: int, start: float = 1.0) -> torch.Tensor:
    return torch.arange(batch * CHANNELS * tokens, dtype=torch.float32).reshape(batch, CHANNELS, tokens) + start


def test_prefill_sees_no_state_and_pads_short_prompts_to_the_kernel():
    cache = StaticKVCache(num_layers=2, max_len=8, device=torch.device("cpu"))
    assert cache.get_conv_state(1) is None and cache.get_recurrent_state(1) is None
    prompt = _conv_inputs(2, 2)
    full = cache.update_conv_state(prompt, 1, conv_kernel_size=KERNEL)
    assert full.shape == (2, CHANNELS, KERNEL) and torch.equal(full[..., 2:], prompt) and not full[..., :2].any()
    assert torch.equal(cache.get_conv_state(1), full) and cache.allocated


def test_decode_sees_the_previous_inputs_and_keeps_the_last_kernel_width():
    cache = StaticKVCache(num_layers=1, max_len=8, device=torch.device("cpu"))
    prompt = _conv_inputs(1, 5)
    cache.update_conv_state(prompt, 0, conv_kernel_size=KERNEL)
    buffer = cache.get_conv_state(0)
    token = _conv_inputs(1, 1, start=100.0)
    full = cache.update_conv_state(token, 0, conv_kernel_size=KERNEL)
    assert torch.equal(full, torch.cat([prompt[..., -KERNEL:], token], dim=-1))
    assert cache.get_conv_state(0) is buffer, "the buffer keeps its address for compiled graphs"
    assert torch.equal(buffer, full[..., -KERNEL:])


def test_a_new_prompt_starts_from_a_zero_state():
    cache = StaticKVCache(num_layers=1, max_len=8, device=torch.device("cpu"))
    with torch.inference_mode():
        cache.update_conv_state(_conv_inputs(1, 5), 0, conv_kernel_size=KERNEL)
        cache.update_recurrent_state(torch.ones(1, 2, 4, 4), 0)
    cache.begin_prompt()
    assert cache.get_conv_state(0) is None and cache.get_recurrent_state(0) is None
    assert not cache.conv_states[(0, 0)].any() and not cache.recurrent_states[(0, 0)].any()


def test_a_serving_row_prefills_from_nothing_into_its_own_row():
    cache = StaticKVCache(num_layers=1, max_len=8, device=torch.device("cpu"), batch_size=3)
    cache.update_recurrent_state(torch.full((3, 2, 2), 7.0), 0)
    row = cache.row(1)
    assert row.get_recurrent_state(0) is None, "a row's prefill never continues another prompt's state"
    row.update_recurrent_state(torch.ones(1, 2, 2), 0)
    assert cache.recurrent_states[(0, 0)][:, 0, 0].tolist() == [7.0, 1.0, 7.0]
    row.update_conv_state(_conv_inputs(1, 2), 0, conv_kernel_size=KERNEL)
    assert cache.conv_states[(0, 0)].shape == (3, CHANNELS, KERNEL) and not cache.conv_states[(0, 0)][0].any()
    assert cache.get_conv_state(0) is not None, "the batch's decode continues the row's state"
