"""A catalogue of bad inputs. Each gets a non-zero exit and one line naming the key / file / tensor / layer and
what would be right: no traceback, and no output file created or changed."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from core.split import main as split_main
from generated_models.gpt_oss.infer import main as infer_main
from scaffold.cli import main as scaffold_main
from scaffold.tiny_quantized import build_tiny_quantized_checkpoint

TP3 = {f"{group}_size": 3 for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}
TP2 = {f"{group}_size": 2 for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}


Q_PROJ = "model.layers.0.self_attn.q_proj.weight_codes"


def settings(model_path, **changes):
    base = {"model_name": "gpt_oss", "model_path": str(model_path), "model_config": {"dtype": "float32"},
            "data_config": {"input_max_len": 32, "max_new_tokens": 4}}
    base.update(changes)
    return base


class Case:
    """`build(tmp, checkpoint) -> argv` prepares files under tmp and returns the command's arguments."""

    def __init__(self, name, command, build, *keywords):
        self.name, self.command, self.build, self.keywords = name, command, build, keywords

    def __repr__(self):
        return self.name


def yaml_file(tmp, content) -> str:
    path = tmp / "settings.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def infer_with(content):
    return lambda tmp, ckpt: ["--config", yaml_file(tmp, content(ckpt) if callable(content) else content),
                              "--output-json", str(tmp / "out" / "result.json")]


def checkpoint_copy(tmp, ckpt) -> Path:
    return Path(shutil.copytree(ckpt, tmp / "checkpoint"))


def damaged(change):
    """An infer run on a copy of the tiny checkpoint that `change(folder)` damaged."""
    def build(tmp, ckpt):
        folder = checkpoint_copy(tmp, ckpt)
        change(folder)
        return infer_with(settings(folder))(tmp, ckpt)
    return build


def edit_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def edit_weights(edit):
    def change(folder):
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors")
    return change


def split_with(config_fields, sizes):
    """split-weights at TP=3/2 of a checkpoint whose config was changed: sizes that do not split."""
    def build(tmp, ckpt):
        folder = checkpoint_copy(tmp, ckpt)
        edit_config(**config_fields)(folder)
        world = next(iter(sizes.values()))
        path = yaml_file(tmp, settings(folder, world_size=world, parallel_config=sizes))
        return ["--config", path, "--out", str(tmp / "out")]
    return build


def quantized(quantization, change=lambda folder: None, **setting_changes):
    """An infer run on a tiny gpt_oss checkpoint stored as `quantization`, damaged by `change(folder)`."""
    def build(tmp, ckpt):
        folder = build_tiny_quantized_checkpoint("gpt_oss", tmp / "checkpoint", quantization)
        change(folder)
        return infer_with(settings(folder, **setting_changes))(tmp, ckpt)
    return build


def split_quantized(quantization, sizes):
    def build(tmp, ckpt):
        folder = build_tiny_quantized_checkpoint("gpt_oss", tmp / "checkpoint", quantization)
        world = next(iter(sizes.values()))
        path = yaml_file(tmp, settings(folder, world_size=world, parallel_config=sizes))
        return ["--config", path, "--out", str(tmp / "out")]
    return build


def dataset_with(lines):
    """An infer run whose data_config.dataset is a JSONL file of `lines`."""
    def build(tmp, ckpt):
        dataset = tmp / "data.jsonl"
        dataset.write_text("".join(line + "\n" for line in lines))
        return infer_with(settings(ckpt, data_config={"dataset": str(dataset), "max_new_tokens": 4}))(tmp, ckpt)
    return build


GOOD_RECORD = '{"id": 1, "prompt": "Hello"}'
SCALES = "model.layers.0.mlp.experts.gate_up_proj_scales"
GRID = "model.layers.0.self_attn.q_proj.weight_scale_inv"
TP4 = {f"{group}_size": 4 for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}

CASES = [
    # runner_settings YAML
    Case("yaml syntax error", "infer", infer_with("model_name: gpt_oss\nmodel_path: [oops\n"),
         "YAML syntax error at line"),
    Case("yaml not a mapping", "infer", infer_with("- model_name\n- model_path\n"), "expected a mapping"),
    Case("unknown key", "infer", infer_with(lambda c: {**settings(c), "exe_mod": "eager"}),
         "unknown key 'exe_mod'", "did you mean 'exe_mode'"),
    Case("unknown nested key", "infer", infer_with(lambda c: settings(c, data_config={"max_new_token": 4})),
         "unknown key 'data_config.max_new_token'", "max_new_tokens"),
    Case("missing required key", "infer", infer_with({"model_name": "gpt_oss"}),
         "missing required key 'model_path'"),
    Case("wrong type string for int", "infer", infer_with(lambda c: settings(c, data_config={"batch_size": "four"})),
         "'data_config.batch_size' must be an integer", "'four'"),
    Case("wrong type bool for int", "infer", infer_with(lambda c: settings(c, world_size=True)),
         "'world_size' must be an integer"),
    Case("wrong type for bool", "infer",
         infer_with(lambda c: settings(c, model_config={"enable_profiler": "yes"})),
         "'model_config.enable_profiler' must be true or false"),
    Case("zero size", "infer", infer_with(lambda c: settings(c, data_config={"max_new_tokens": 0})),
         "'data_config.max_new_tokens' must be at least 1, got 0"),
    Case("negative size", "infer", infer_with(lambda c: settings(c, data_config={"input_max_len": -8})),
         "'data_config.input_max_len' must be at least 1, got -8"),
    Case("bad choice", "infer", infer_with(lambda c: settings(c, model_config={"dtype": "fp32"})),
         "'model_config.dtype' is 'fp32'", "float32"),
    Case("tp size differs from world", "infer",
         infer_with(lambda c: settings(c, world_size=4, parallel_config={"attn_tp_size": 3})),
         "parallel_config.attn_tp_size is 3 but world_size is 4"),
    Case("tp group smaller than world", "infer",
         infer_with(lambda c: settings(c, world_size=2, parallel_config={**TP2, "attn_tp_size": 1})),
         "parallel_config.attn_tp_size is 1 but world_size is 2", "set attn_tp_size: 2"),
    Case("world size not launched", "infer", infer_with(lambda c: settings(c, world_size=2, parallel_config=TP2)),
         "world_size is 2 in runner_settings but 1 processes were launched", "torchrun --nproc-per-node 2"),
    Case("exe_mode the device cannot run", "infer", infer_with(lambda c: settings(c, exe_mode="acl_graph")),
         "exe_mode 'acl_graph' cannot run on cpu", "modes available on cpu: eager, inductor"),
    Case("tp does not divide heads", "split", split_with({}, TP3),
         "layer 'model.layers.0.self_attn.qkv_proj'", "4 heads of q_proj", "attn_tp_size 3"),
    Case("tp does not divide kv heads", "split",
         split_with({"num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 16}, TP3),
         "layer 'model.layers.0.self_attn.qkv_proj'", "4 heads of k_proj", "attn_tp_size 3"),
    Case("tp does not divide vocab", "split", split_with({"vocab_size": 385}, TP2),
         "layer 'model.embed_tokens'", "vocabulary 385", "embed_tp_size 2"),
    Case("tp does not divide intermediate", "split",
         split_with({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16}, TP3),
         "parameter 'model.layers.0.mlp.experts.gate_up_proj'", "dimension 2 of size 128 is not divisible by moe_tp_size 3"),
    Case("sequence budget beyond max_position_embeddings", "infer",
         damaged(edit_config(max_position_embeddings=16)), "exceeds max_position_embeddings 16"),
    Case("placeholder model_path", "infer", infer_with(lambda c: settings("/path/to/gpt_oss")),
         "model_path is still the placeholder"),
    Case("missing config file", "infer", lambda tmp, ckpt: ["--config", str(tmp / "nope.yaml")],
         "nope.yaml does not exist"),
    # sampling and datasets
    Case("negative temperature", "infer", infer_with(lambda c: settings(c, sampling_config={"temperature": -1})),
         "sampling_config.temperature must be at least 0", "got -1"),
    Case("top_p outside (0, 1]", "infer", lambda tmp, ckpt: infer_with(settings(ckpt))(tmp, ckpt) + ["--top-p", "1.5"],
         "sampling_config.top_p must be in (0, 1], got 1.5"),
    Case("negative top_k", "infer", infer_with(lambda c: settings(c, sampling_config={"top_k": -3})),
         "sampling_config.top_k must be at least 0"),
    Case("misspelt sampling key", "infer", infer_with(lambda c: settings(c, sampling_config={"temprature": 0.7})),
         "unknown key 'sampling_config.temprature'", "did you mean 'sampling_config.temperature'"),
    Case("dataset record without a prompt", "infer", dataset_with([GOOD_RECORD, GOOD_RECORD.replace("1", "2"),
                                                                   '{"id": 3, "text": "Hi"}']),
         "data.jsonl line 3", "unknown field 'text'"),
    Case("dataset line not JSON", "infer", dataset_with([GOOD_RECORD, '{"id": 2, "prompt": "Hi"']),
         "data.jsonl line 2: not valid JSON"),
    Case("dataset ids repeat", "infer", dataset_with([GOOD_RECORD, GOOD_RECORD]),
         "data.jsonl line 2: id '1' repeats", "line 1"),
    Case("dataset chat without roles", "infer", dataset_with(['{"id": 1, "messages": [{"content": "Hi"}]}']),
         "data.jsonl line 1", "\"messages\" must be a non-empty list"),
    Case("missing dataset file", "infer",
         infer_with(lambda c: settings(c, data_config={"dataset": "/no/such/prompts.jsonl"})),
         "/no/such/prompts.jsonl does not exist"),
    # checkpoints
    Case("missing checkpoint folder", "infer", infer_with(lambda c: settings("/no/such/checkpoint")),
         "/no/such/checkpoint/config.json does not exist"),
    Case("missing safetensors", "infer", damaged(lambda f: (f / "model.safetensors").unlink()),
         "holds neither model.safetensors nor model.safetensors.index.json"),
    Case("truncated safetensors", "infer",
         damaged(lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000])),
         "truncated"),
    Case("garbage safetensors", "infer", damaged(lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 7)),
         "cannot read", "model.safetensors"),
    Case("missing shard", "infer", damaged(lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))),
         "names shard files that are missing", "model-00002-of-00002.safetensors"),
    Case("missing tensor", "infer", damaged(edit_weights(lambda w: w.pop("model.layers.0.self_attn.sinks"))),
         "lacks tensors the model needs", "model.layers.0.self_attn.sinks"),
    Case("wrong tensor shape", "infer",
         damaged(edit_weights(lambda w: w.update({"model.norm.weight": torch.ones(32)}))),
         "'model.norm.weight' has shape [32]", "expects [64]"),
    Case("architecture mismatch", "infer", damaged(edit_config(model_type="llama")),
         "describes a 'llama' model but this port is for 'gpt_oss'"),
    # Refused from config.json alone: the weights file here is not even readable.
    Case("unsupported quantization", "infer",
         damaged(lambda f: edit_config(quantization_config={"quant_method": "awq", "bits": 4})(f)
                 or (f / "model.safetensors").write_bytes(b"\x00" * 7)),
         "quantization 'awq'", "supported: fp8, int_groups, mxfp4"),
    Case("weight_quant group size the kernel lacks", "infer",
         infer_with(lambda c: settings(c, model_config={"dtype": "float32", "weight_quant": "int4",
                                                        "weight_quant_group_size": 48})),
         "weight_quant_group_size", "48", "32, 64, 128, 256"),
    Case("int_groups codes of the wrong width", "infer",
         damaged(lambda f: (edit_config(quantization_config={"quant_method": "int_groups", "group_size": 32})(f),
                            edit_weights(lambda w: w.update({
                                Q_PROJ: torch.zeros(64, 8, dtype=torch.uint8),
                                Q_PROJ.replace("codes", "scales"): torch.ones(64, 2, dtype=torch.float16),
                                Q_PROJ.replace("codes", "mins"): torch.zeros(64, 2, dtype=torch.float16)}))(f))),
         f"int_groups codes '{Q_PROJ}'", "must be uint8 [64, 32]"),
    Case("truncated mxfp4 scales", "infer",
         quantized("mxfp4", edit_weights(lambda w: w.update({SCALES: w[SCALES][:, :-1].contiguous()}))),
         f"mxfp4 scales '{SCALES}' have shape [4, 127, 2]", "need [4, 128, 2]"),
    Case("fp8 scale grid does not fit its weight", "infer",
         quantized("fp8", edit_weights(lambda w: w.update({GRID: w[GRID][:, :1].contiguous()}))),
         f"scale tensor '{GRID}' has shape [4, 1]", "[16, 16] blocks needs [4, 4]"),
    Case("fp8 weight without its scale", "infer", quantized("fp8", edit_weights(lambda w: w.pop(GRID))),
         "fp8 tensor 'model.layers.0.self_attn.q_proj.weight' has no scale"),
    Case("packed mode on fp8", "infer", quantized("fp8", model_config={"dtype": "float32",
                                                                       "quant_weight_mode": "packed"}),
         "quant_weight_mode 'packed' is not available for fp8 checkpoints", "choose dequantize"),
    Case("tp split cuts an mxfp4 block", "split", split_quantized("mxfp4", TP4),
         "layer 'model.layers.0.mlp.experts.down_proj'", "32-wide quantization blocks", "moe_tp_size 4"),
    Case("invalid config.json", "infer", damaged(lambda f: (f / "config.json").write_text("{not json")),
         "config.json is not valid JSON"),
    # scaffold
    Case("unknown model", "scaffold", lambda tmp, ckpt: ["gpt_os", "--out", str(tmp / "out")],
         "no model named 'gpt_os'", "did you mean gpt_oss"),
    Case("encoder-only model", "scaffold", lambda tmp, ckpt: ["distilbert", "--out", str(tmp / "out")],
         "exactly one *ForCausalLM class", "found: none"),
    Case("unwritable output folder", "scaffold",
         lambda tmp, ckpt: (tmp / "file").write_text("x") and ["gpt_oss", "--out", str(tmp / "file")],
         "cannot write under"),
    Case("missing --from folder", "scaffold",
         lambda tmp, ckpt: ["mine", "--from", str(tmp / "absent"), "--out", str(tmp / "out")], "no such folder"),
    Case("folder without modeling file", "scaffold",
         lambda tmp, ckpt: (tmp / "src").mkdir() or (tmp / "src" / "config.json").write_text("{}") and
         ["mine", "--from", str(tmp / "src"), "--out", str(tmp / "out")], "expected exactly one modeling_*.py"),
    Case("split of a model without a port", "split",
         lambda tmp, ckpt: ["--config", yaml_file(tmp, {"model_name": "nosuch", "model_path": str(ckpt)}),
                            "--out", str(tmp / "out")], "no generated port", "recipes-scaffold nosuch"),
]
COMMANDS = {"infer": infer_main, "scaffold": scaffold_main, "split": split_main}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file()}


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bad_input_is_one_clear_line(case, tiny_gpt_oss, tmp_path, capsys):
    argv = case.build(tmp_path, tiny_gpt_oss)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[case.command](argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    lines = [line for line in error.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in error, error
    for keyword in case.keywords:
        assert keyword in lines[0], f"{keyword!r} not in {lines[0]!r}"
    assert snapshot(tmp_path) == before, "a failed run created or changed files"


def test_long_prompt_is_truncated_with_a_warning(tiny_gpt_oss, tmp_path, caplog):
    output = tmp_path / "result.json"
    config = yaml_file(tmp_path, settings(tiny_gpt_oss, data_config={"input_max_len": 8, "max_new_tokens": 2}))
    infer_main(["--config", config, "--prompt", "The quick brown fox jumps over the lazy dog " * 3,
                "--output-json", str(output)])
    assert "truncated to data_config.input_max_len 8" in caplog.text
    assert len(json.loads(output.read_text())["output_token_ids"][0]) == 2
