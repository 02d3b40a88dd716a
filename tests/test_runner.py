"""core.ModelRunner through the generated gpt_oss port: loading paths, batching, errors, the infer entry."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from core.errors import CheckpointError, DeviceError, SettingsError
from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog"]


def settings_for(model_path, **sections):
    settings = {
        "model_name": "gpt_oss",
        "model_path": str(model_path),
        "model_config": {"dtype": "float32", "device": "cpu"},
        "data_config": {"input_max_len": 32, "max_new_tokens": 6, "batch_size": 2},
    }
    for key, value in sections.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


def generate(model_path, prompts=PROMPTS, **sections):
    runner = GptOssRunner(settings_for(model_path, **sections))
    runner.init_model()
    return runner.model_generate(prompts, ignore_eos=True)


def test_batched_rows_equal_single_prompt_runs(tiny_gpt_oss):
    batched = generate(tiny_gpt_oss)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(tiny_gpt_oss, [prompt], data_config={"batch_size": 1})
        assert alone.output_token_ids[0] == batched.output_token_ids[row]


def test_sharded_checkpoint_loads_like_single_file(tiny_gpt_oss, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_gpt_oss / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert generate(sharded).output_token_ids == generate(tiny_gpt_oss).output_token_ids


def test_offline_split_reads_rank_folder(tiny_gpt_oss, tmp_path):
    shutil.copytree(tiny_gpt_oss, tmp_path / "rank_0")
    shutil.copy(tiny_gpt_oss / "config.json", tmp_path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_gpt_oss / name, tmp_path / name)
    offline = generate(tmp_path, model_config={"enable_online_split_weight": False})
    assert offline.output_token_ids == generate(tiny_gpt_oss).output_token_ids


def test_offline_split_without_rank_folder_says_what_to_do(tiny_gpt_oss):
    with pytest.raises(CheckpointError, match=r"rank_0.*enable_online_split_weight: true"):
        generate(tiny_gpt_oss, model_config={"enable_online_split_weight": False})


def test_random_init_from_config_generates(tiny_gpt_oss):
    result = generate(tiny_gpt_oss, model_config={"with_ckpt": False})
    assert [len(row) for row in result.output_token_ids] == [6, 6]


def test_missing_tensor_is_named(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["model.layers.1.self_attn.sinks"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.sinks"):
        generate(checkpoint_copy)


def test_wrong_shape_is_named_with_both_shapes(checkpoint_copy):
    weights = load_file(checkpoint_copy / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, checkpoint_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[3\].*expects \[64\]"):
        generate(checkpoint_copy)


def test_truncated_checkpoint_is_reported(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        generate(checkpoint_copy)


def test_unsupported_quantization_rejected(checkpoint_copy):
    config_path = checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization 'awq'.*supported: fp8, int_groups, mxfp4"):
        generate(checkpoint_copy)


def test_architecture_mismatch_rejected(checkpoint_copy):
    config_path = checkpoint_copy / "config.json"
    config_path.write_text(config_path.read_text().replace('"gpt_oss"', '"llama"'))
    with pytest.raises(CheckpointError, match="'llama' model but this port is for 'gpt_oss'"):
        generate(checkpoint_copy)


def test_sequence_budget_checked_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "max_position_embeddings": 16}))
    with pytest.raises(SettingsError, match="exceeds max_position_embeddings 16"):
        generate(tmp_path)


def test_graph_mode_the_device_cannot_run_lists_available_modes(tiny_gpt_oss):
    with pytest.raises(DeviceError, match="exe_mode 'ge_graph' cannot run on cpu; modes available on cpu: eager"):
        GptOssRunner(settings_for(tiny_gpt_oss, exe_mode="ge_graph"))


def test_placeholder_model_path_is_caught():
    runner = GptOssRunner(settings_for("/path/to/gpt_oss"))
    with pytest.raises(SettingsError, match="placeholder"):
        runner.init_model()


def test_infer_entry_prints_and_writes_json(tiny_gpt_oss, tmp_path):
    output = tmp_path / "out.json"
    result = run_cli(
        "-m", "generated_models.gpt_oss.infer", "--config", "config/gpt_oss.yaml",
        "--model-path", str(tiny_gpt_oss), "--prompt", "Hello", "--prompt", "The quick brown fox",
        "--output-json", str(output),
    )
    assert result.returncode == 0, result.stderr
    assert "timing (eager): prefill" in result.stdout and "recompiles after warm-up 0" in result.stdout
    report = json.loads(output.read_text())
    assert report["prompts"] == ["Hello", "The quick brown fox"]
    assert len(report["outputs"]) == 2 and len(report["output_token_ids"]) == 2
    assert {"prefill_ms", "decode_ms_mean", "decode_tokens_per_s"} <= report["timing"].keys()


def test_infer_with_bad_yaml_is_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name: gpt_oss\nmodel_path: /m\nexe_mod: eager\n")
    result = run_cli("-m", "generated_models.gpt_oss.infer", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key 'exe_mod'; did you mean 'exe_mode'?" in result.stderr
