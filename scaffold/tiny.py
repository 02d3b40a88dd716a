"""Tiny random checkpoints of an architecture: HF's own model class, a fixed seed, a small trained tokenizer.

Dimensions shrink but keep what the port must get right: several heads with fewer KV heads (GQA), more than
one layer, experts routed top-2, a sliding window shorter than the test sequences.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast

from scaffold.errors import ScaffoldError

TOKENIZER_VOCAB_SIZE = 384
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A port is proven against the reference on the same weights.
In a hole in the ground there lived a hobbit, not a nasty, dirty, wet hole, filled with the ends of worms.
Explain what a language model is. Write a haiku about the sea. The three primary colours are red, yellow and blue.
Tensor parallel layers split each weight across ranks; the attention heads, the experts and the vocabulary too.
What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Code: def forward(self, hidden_states): return hidden_states
"""

# Applied where the architecture's config has the attribute; per-architecture entries win.
TINY_DIMENSIONS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rotary_dim": 8,  # GPT-J / CodeGen: rotate part of each 16-wide head
    "intermediate_size": 64,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    # DeepSeek-style models keep their first k layers dense: with k=1 of 2 layers both kinds are checked.
    "first_k_dense_replace": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,  # DeepSeek routing: experts in 2 groups, the best 1 group kept
    "topk_group": 1,
    # Multi-head latent attention (DeepSeek V2/V3 and kin): low-rank q and kv, a rotated and a plain part per head.
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 8,
    "n_positions": 128,  # GPT-2's learned positions, replicated on every rank: enough for the tests' sequences
    "attention_chunk_size": 8,
    "initializer_range": 0.1,
    # Gated DeltaNet (Qwen3-Next, Qwen3.5, Kimi-Linear, OLMo hybrid): 2 key heads, each shared by 2 value heads.
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    # Mamba2 mixers (Granite 4 hybrid, Falcon-H1, Bamba): 8 heads of expand * hidden_size / 8, a small state.
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_ssm": 128,  # Falcon-H1 sizes the mixer itself: 8 heads x 16
    "mamba_d_state": 16,
    "shared_intermediate_size": 64,
    # Encoder-decoder families' causal LM is their decoder, sized by its own keys (BART, Marian, Whisper, TrOCR).
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    # BERT-style configs attend bidirectionally unless told they are a decoder, as their causal-LM class expects.
    "is_decoder": True,
}
# Hybrids whose default config hides a layer kind from two layers: an attention layer comes first, so that the
# linear one after it sees padding positions with non-zero inputs (the pad embedding row is zero) and a missing
# padding mask would show.
ARCHITECTURE_OVERRIDES: dict[str, dict] = {
    "lfm2": {"layer_types": ["full_attention", "conv"]},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"]},
    "granitemoehybrid": {"layer_types": ["full_attention", "linear_attention"]},
    "bamba": {"attn_layer_indices": [0]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},
    "recurrent_gemma": {"block_types": ["attention", "recurrent"]},
    "mamba2": {"num_heads": 8},
    "zaya": {"num_experts_per_tok": 1},  # the only routing ZAYA supports
    "gemma3n_text": {"num_kv_shared_layers": 0},  # KV sharing needs more layers than two  # heads x head_dim must equal expand x hidden_size
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"]},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one entry per layer: 2 layers
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "llama4_text": {"no_rope_layers": [1, 0]},  # a chunked (rope) layer and a global (no-rope) one
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.split("\n"), trainer=trainer)
    pad, bos, eos = SPECIAL_TOKENS
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _settable(config: PreTrainedConfig, key: str) -> bool:
    """The config has `key` as a plain attribute, not a derived read-only property (Falcon's head_dim)."""
    stored = getattr(config, "attribute_map", {}).get(key, key)  # Bamba's layer_types is its layers_block_type
    try:
        present = hasattr(config, key)
    except Exception:  # noqa: BLE001 - Gemma 4 raises on per-layer attributes read globally: not settable
        return False
    return present and not isinstance(getattr(type(config), stored, None), property)


# Layer kinds that keep a recurrent state instead of keys and values.
RECURRENT_KINDS = ("linear_attention", "conv", "mamba", "recurrent")


def _layer_kinds(defaults: PreTrainedConfig) -> dict:
    """`layer_types` with one layer of every kind the full-size config has, attention kinds first, when the
    default pattern's first two layers would miss one (Qwen3-Next's linear layers come three to a full one)."""
    layer_types = getattr(defaults, "layer_types", None) if _settable(defaults, "layer_types") else None
    if not isinstance(layer_types, list) or not layer_types:
        return {}
    kinds = sorted(dict.fromkeys(layer_types), key=lambda kind: kind in RECURRENT_KINDS)
    if set(layer_types[:2]) == set(kinds):
        return {}
    return {"layer_types": kinds if len(kinds) > 1 else kinds * 2, "num_hidden_layers": max(2, len(kinds))}


def _tiny_values(defaults: PreTrainedConfig, token_ids: dict, depth: int = 0) -> dict:
    """The tiny dimensions `defaults` takes, its sub-configs' too (a multimodal checkpoint's text and vision towers),
    and the tokenizer's ids wherever a config has a vocabulary."""
    values = {key: value for key, value in TINY_DIMENSIONS.items() if _settable(defaults, key)}
    if "qk_rope_head_dim" in values:
        # Latent attention's rotary embedding spans only the rotated part of a head, and every head has its own
        # key and value (expanded from the shared latent), so there are as many KV heads as query heads.
        values["head_dim"] = values["qk_rope_head_dim"]
        values["num_key_value_heads"] = values["num_attention_heads"]
    values.update(_layer_kinds(defaults))
    values.update(ARCHITECTURE_OVERRIDES.get(defaults.model_type, {}))
    if hasattr(defaults, "vocab_size"):
        values.update(token_ids)
    for key in getattr(defaults, "sub_configs", {}) if depth < 2 else ():
        sub_config = getattr(defaults, key, None)
        if isinstance(sub_config, PreTrainedConfig):
            values[key] = {"model_type": sub_config.model_type, **_tiny_values(sub_config, token_ids, depth + 1)}
    return values


def tiny_config(model_type: str, tokenizer: PreTrainedTokenizerFast, **overrides) -> PreTrainedConfig:
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        raise ScaffoldError(f"transformers has no config for model_type '{model_type}'") from None
    token_ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                 "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    values = _tiny_values(defaults, token_ids)
    text_key = next((key for key in getattr(defaults, "sub_configs", {})
                     if getattr(defaults, key, None) is defaults.get_text_config(decoder=True)), None)
    for key, value in overrides.items():
        # A composite (multimodal) config's text model takes what the top level lacks (its KV head count, …).
        target = values[text_key] if text_key and not _settable(defaults, key) else values
        target[key] = value
    values.update(token_ids)
    return AutoConfig.for_model(model_type, **values)


def build_tiny_checkpoint(model_type: str, out_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save HF's own `model_type` causal LM, randomly initialised with `seed`, and a tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(model_type, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
