"""The names HF model code gives head counts and head sizes: one list for the planner and the transforms."""

from __future__ import annotations

import libcst.matchers as m

# Config attributes that count heads (GPT-Neo, MPT and kin name them num_heads / n_heads).
HEAD_COUNTS = frozenset(
    {"num_attention_heads", "num_key_value_heads", "num_heads", "n_head", "n_heads", "num_kv_heads",
     # Gated DeltaNet's key and value heads (Qwen3-Next, Qwen3.5, OLMo hybrid, Kimi-Linear)
     "linear_num_key_heads", "linear_num_value_heads",
     # Mamba2 mixers' heads and B/C groups (Granite 4 hybrid, Falcon-H1, Bamba, Mamba2)
     "mamba_n_heads", "mamba_n_groups", "n_groups"}
)
# What a head-sharded module keeps per rank: its head counts, and the KV grouping derived from them.
PER_RANK_HEAD_COUNTS = HEAD_COUNTS | {"num_key_value_groups", "num_k_heads", "num_v_heads"}
HEAD_SIZES = frozenset({"head_dim", "head_size", "attn_head_size"})
HEAD_COUNT_NAME = m.OneOf(*map(m.Name, sorted(HEAD_COUNTS)))
# The query head count as a per-head parameter's size names it in __init__: the config's, or the class's own copy.
QUERY_HEAD_COUNT_NAME = m.Name("num_heads") | m.Name("num_attention_heads")
