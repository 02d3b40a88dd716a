"""Static-cache attention masks: which cache slots each query sees, per layer type."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Llama4TextConfig, LlamaConfig

from core.attention_mask import masks_for_model


def _visible(mask: torch.Tensor, row: int, query: int) -> list[int]:
    return (mask[row, 0, query] == 0).nonzero().flatten().tolist()


def test_chunked_layers_see_only_their_chunk_counted_from_the_first_real_token():
    config = Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=4, no_rope_layers=[1, 0])
    # Row 0 has two left pads: its positions 0..5 sit in slots 2..7; row 1 fills slots 0..7.
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    masks = masks_for_model(config, attention_mask, torch.arange(8), torch.float32)
    assert set(masks) == {"chunked_attention", "full_attention"}
    assert _visible(masks["chunked_attention"], 0, 7) == [6, 7]  # positions 4, 5: the second chunk
    assert _visible(masks["chunked_attention"], 1, 7) == [4, 5, 6, 7]
    assert _visible(masks["full_attention"], 0, 7) == [2, 3, 4, 5, 6, 7]


def test_indexed_attention_layers_get_the_causal_mask():
    config = LlamaConfig(num_hidden_layers=1, layer_types=["indexed_attention"])
    attention_mask = torch.tensor([[0, 1, 1, 1]])
    masks = masks_for_model(config, attention_mask, torch.arange(4), torch.float32)
    assert _visible(masks["indexed_attention"], 0, 3) == [1, 2, 3]


def test_a_layer_type_without_a_mask_is_named():
    config = SimpleNamespace(layer_types=["dilated_attention"])  # HF's configs refuse unknown kinds themselves
    with pytest.raises(ValueError, match=r"\['dilated_attention'\].*full_attention.*linear_attention"):
        masks_for_model(config, torch.ones(1, 4, dtype=torch.long), torch.arange(4), torch.float32)


def test_hybrid_models_get_the_padding_mask_of_the_new_tokens_under_hf_keys():
    config = LlamaConfig(num_hidden_layers=2, layer_types=["hybrid", "conv"])
    attention_mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])  # slot 3 is not written yet
    masks = masks_for_model(config, attention_mask, torch.arange(3), torch.float32)
    assert masks["linear_attention"].tolist() == masks["conv"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert _visible(masks["hybrid"], 0, 2) == [1, 2] and masks["hybrid"] is masks["full_attention"]


def test_a_model_without_attention_layers_takes_the_padding_mask_itself():
    config = LlamaConfig(num_hidden_layers=2, layer_types=["linear_attention", "linear_attention"])
    mask = masks_for_model(config, torch.tensor([[0, 1, 1, 1]]), torch.arange(2, 4), torch.float32)
    assert mask.tolist() == [[1.0, 1.0]]
