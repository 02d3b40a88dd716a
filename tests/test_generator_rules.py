"""Generator rules that no committed port exercises, each proven on the architecture that needs it: generated,
then verified against HF eager at TP=1 and TP=2 by `recipes-scaffold sweep`.

- afmoe: a per-head output gate projection, column-parallel by heads.
- glm: gate|up fused on disk as `2 * intermediate_size`: each half splits on its own.
- llama4_text: chunked local attention (chunks counted from each row's first real token).
- deepseek_v32: indexed (sparse) attention: a causal mask and a static cache for the indexer's keys.
- lfm2: short-convolution layers (a conv state, no recurrent one) under the `conv` layer type.
- bart: a decoder counting learned positions from the cache length; HF's forced EOS is not greedy decoding.
- roberta: a BERT-style decoder: `is_decoder` in the tiny config, its LM head found by get_output_embeddings (a
  vocabulary bias tied to it), its `dense` layers told apart by class.
- falcon_mamba: a Mamba1 mixer split by channels (a per-rank size in a class without heads, x_proj summed over
  the ranks), and a norm built over the channels that acts on a whole tensor (the override's `whole`).

Per-head attention sinks split with the heads, and a q/k norm spanning all heads, are proven by the committed
gpt_oss and olmo2 ports' own TP=2 tests; one KV head shared by every query head (the static cache shaped by the
model's first write) by every GQA port's one-KV-head case; head counts named `num_heads` with __init__ size checks
on the full count by gpt2; linear attention and Mamba2 mixers (recurrent states, split by heads) by
qwen3_next, qwen3_5_text, granitemoehybrid and falcon_h1; the auto mapping's LM-head class and GPT-2's Conv1D by
gpt2; a composite checkpoint by gemma3.
"""

import json

import pytest
from conftest import run_cli

from scaffold.inspect import inspect_model
from scaffold.locate import locate_transformers_model
from scaffold.plan import plan_tensor_parallel

ARCHITECTURES = ["afmoe", "glm", "llama4_text", "deepseek_v32", "lfm2", "bart", "roberta", "falcon_mamba"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    report = tmp_path_factory.mktemp("rules") / "sweep.json"
    only = [arg for architecture in ARCHITECTURES for arg in ("--only", architecture)]
    result = run_cli("-m", "scaffold.cli", "sweep", "--tp", "2", "--jobs", "2", *only, "--json", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    return {row["architecture"]: row for row in json.loads(report.read_text())["rows"]}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rule_makes_the_architecture_exact_at_tp1_and_tp2(rows, architecture):
    row = rows[architecture]
    assert row["tp1_exact"] and row["tp2_exact"], row["reason"]


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "jamba"])
def test_mamba1_mixers_split_every_weight_by_channels(model_type):
    spec = inspect_model(locate_transformers_model(model_type))
    plan = plan_tensor_parallel(spec)
    mixer = next(name for name in spec.causal_lm_classes() if name.endswith("MambaMixer"))
    roles = {weight.attribute: plan.role_of(mixer, weight.attribute).role for weight in spec.classes[mixer].weights}
    assert roles == {"conv1d": "channels", "in_proj": "merged_column", "x_proj": "row", "dt_proj": "column",
                     "A_log": "sharded", "D": "sharded", "out_proj": "row"}
