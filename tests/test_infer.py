"""core.infer.main, the command line every port's infer.py runs: its output lines, the JSON report, the default
prompts, rank 0 alone printing, warm-up in graph modes, and a bad YAML as one line with exit status 2."""

import json
import logging
import re

import pytest
import yaml

import core.infer
from core.model_runner import GenerationResult
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import build_tiny_checkpoint

TIMING_LINE = re.compile(
    r"timing \(eager\): prefill [\d.]+ ms, decode [\d.]+ ms/step \(p50 [\d.]+, p90 [\d.]+\), [\d.]+ tokens/s, "
    r"compile [\d.]+ s, recompiles after warm-up 0"
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def restore_log_level():
    """main quietens the root logger on ranks other than 0; later tests expect it as it was."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


def settings_file(tmp_path, model_path, exe_mode="eager", batch_size=2) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": "llama", "model_path": str(model_path), "exe_mode": exe_mode,
        "model_config": {"dtype": "float32", "device": "cpu"},
        "data_config": {"input_max_len": 16, "max_new_tokens": 3, "batch_size": batch_size},
    }))
    return str(path)


def test_prints_every_prompt_and_the_timing_and_writes_the_report(tiny_llama, tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    argv = ["--config", settings_file(tmp_path, "/path/to/llama"), "--model-path", str(tiny_llama),
            "--prompt", "Hello", "--prompt", "The quick brown fox", "--output-json", str(report_path)]
    assert core.infer.main(LlamaRunner, argv, model_name="llama") is None
    stdout = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["prompts"] == ["Hello", "The quick brown fox"]
    assert [len(ids) for ids in report["output_token_ids"]] == [3, 3]
    assert {"prefill_ms", "decode_ms_mean", "decode_tokens_per_s"} <= report["timing"].keys()
    expected = "".join(f"prompt: {prompt!r}\noutput: {output!r}\n\n"
                       for prompt, output in zip(report["prompts"], report["outputs"]))
    assert stdout.startswith(expected)
    assert TIMING_LINE.fullmatch(stdout[len(expected):].rstrip("\n"))


def test_default_prompts_ask_about_the_model_and_fill_the_batch(tiny_llama, tmp_path):
    report_path = tmp_path / "report.json"
    argv = ["--config", settings_file(tmp_path, tiny_llama, batch_size=4), "--output-json", str(report_path)]
    core.infer.main(LlamaRunner, argv, model_name="llama")
    assert json.loads(report_path.read_text())["prompts"] == [
        "Explain what llama is.", "Write a haiku about the sea.", "The three primary colours are",
        "Explain what llama is.",
    ]


def test_bad_yaml_is_one_line_and_exit_status_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name: llama\nmodel_path: [oops\n")
    with pytest.raises(SystemExit) as exit_info:
        core.infer.main(LlamaRunner, ["--config", str(config)], model_name="llama")
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith(f"error: {config}: YAML syntax error at line 3") and error.count("\n") == 1, error


class RecordingRunner:
    """Stands in for a port's runner: records the warm_up flag main passes, generates nothing."""

    global_rank = 0
    warm_ups: list[bool] = []

    def __init__(self, runner_settings):
        self.exe_mode = runner_settings["exe_mode"]

    def init_model(self):
        pass

    def model_generate(self, prompts, warm_up):
        self.warm_ups.append(warm_up)
        timing = dict.fromkeys(("prefill_ms", "decode_ms_mean", "decode_ms_p50", "decode_ms_p90",
                                "decode_tokens_per_s", "compile_s", "recompiles_after_warmup"), 0)
        return GenerationResult(prompts, ["out"] * len(prompts), [[0]] * len(prompts), timing)


@pytest.mark.parametrize("exe_mode, warm_up", [("eager", False), ("inductor", True)])
def test_graph_modes_warm_up_first(tmp_path, monkeypatch, exe_mode, warm_up):
    monkeypatch.setattr(RecordingRunner, "warm_ups", [])
    core.infer.main(RecordingRunner, ["--config", settings_file(tmp_path, tmp_path, exe_mode)], model_name="llama")
    assert RecordingRunner.warm_ups == [warm_up]


def test_ranks_other_than_0_print_and_write_nothing(tmp_path, capsys, monkeypatch, restore_log_level):
    monkeypatch.setattr(RecordingRunner, "global_rank", 1)
    report_path = tmp_path / "report.json"
    core.infer.main(RecordingRunner, ["--config", settings_file(tmp_path, tmp_path), "--output-json",
                                      str(report_path)], model_name="llama")
    assert capsys.readouterr().out == "" and not report_path.exists()
