"""Tensor parallelism at TP=2 on CPU (torchrun, gloo): each parallel layer against its plain counterpart, and the
errors a user gets for sizes that do not split."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from core.errors import SettingsError
from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_every_parallel_layer_equals_the_plain_layer_at_tp2(measurements):
    result = subprocess.run([*TORCHRUN, "--nproc-per-node=2", str(REPO / "tests/tp_layers_worker.py")],
                            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("held_whole") == ["norm"]
    measurements.append("parallel layers at TP=2, max |parallel - plain|: "
                        + ", ".join(f"{case} {diff:.1e}" for case, diff in results.items()
                                    if not isinstance(diff, str)))
    rejected = results.pop("uneven_heads_rejected")
    assert "layer 'proj': 3 heads cannot be split over attn_tp_size 2" in rejected
    assert {case: diff for case, diff in results.items() if diff > 1e-5} == {}
    assert len(results) == 17


def test_heads_tp_cannot_split_fail_before_any_weight_is_read(tiny_gpt_oss, tmp_path):
    # No weights at all in model_path: a run that read them first would fail with a checkpoint error instead.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_gpt_oss / name).read_bytes())
    sizes = {f"{group}_size": 3 for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}
    config = tmp_path / "tp3.yaml"
    config.write_text(yaml.safe_dump({"model_name": "gpt_oss", "model_path": str(tmp_path), "world_size": 3,
                                      "model_config": {"dtype": "float32"}, "parallel_config": sizes}))
    result = subprocess.run([*TORCHRUN, "--nproc-per-node=3", "-m", "generated_models.gpt_oss.infer",
                             "--config", str(config)], capture_output=True, text=True, env=ENV, cwd=REPO,
                            timeout=300)
    assert result.returncode != 0
    assert ("layer 'model.layers.0.self_attn.qkv_proj': 4 heads of q_proj cannot be split over attn_tp_size 3"
            in result.stderr)
    assert "model.safetensors" not in result.stderr


def test_tp_group_smaller_than_world_is_rejected_with_the_fix(tiny_gpt_oss, tmp_path):
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump({"model_name": "gpt_oss", "model_path": str(tiny_gpt_oss), "world_size": 2,
                                      "parallel_config": {"attn_tp_size": 1, "moe_tp_size": 2,
                                                          "lmhead_tp_size": 2, "embed_tp_size": 2}}))
    result = subprocess.run([*TORCHRUN, "--nproc-per-node=2", "-m", "generated_models.gpt_oss.infer",
                             "--config", str(config)], capture_output=True, text=True, env=ENV, cwd=REPO,
                            timeout=300)
    assert result.returncode != 0
    assert "parallel_config.attn_tp_size is 1 but world_size is 2" in result.stderr
    assert "set attn_tp_size: 2" in result.stderr


def test_world_size_must_match_launched_processes(tiny_gpt_oss):
    settings = {"model_name": "gpt_oss", "model_path": str(tiny_gpt_oss), "world_size": 2,
                "parallel_config": {"attn_tp_size": 2, "moe_tp_size": 2, "lmhead_tp_size": 2, "embed_tp_size": 2}}
    with pytest.raises(SettingsError, match="world_size is 2 in runner_settings but 1 processes were launched"):
        GptOssRunner(settings)
