"""Dataset runs: records in batches of batch_size, one JSON line each, resumable after a kill; --stream."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import core.infer
from conftest import REPO
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import build_tiny_checkpoint


def write_dataset(path, count):
    with open(path, "w") as file:
        for index in range(count):
            if index % 3 == 0:
                record = {"id": f"q{index}", "messages": [{"role": "user", "content": f"What is {index} plus 2?"}]}
            else:
                record = {"id": f"q{index}", "prompt": f"Item {index}: the colour of the sky is"}
            file.write(json.dumps(record) + "\n")
    return path


def settings_file(folder, model_path, dataset, batch_size, max_new_tokens=4):
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": "llama", "model_path": str(model_path),
        "model_config": {"dtype": "float32", "device": "cpu"},
        "data_config": {"dataset": str(dataset), "batch_size": batch_size, "input_max_len": 64,
                        "max_new_tokens": max_new_tokens},
    }))
    return path


def infer_command(config, output):
    return [sys.executable, "-m", "generated_models.llama.infer", "--config", str(config), "--output-jsonl",
            str(output)]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_run_resumes_to_the_uninterrupted_outputs(smollm2, tmp_path, measurements):
    """96 records on SmolLM2, batch_size 8: a run killed half-way and started again ends with the same 96 lines
    (ids and greedy outputs) as a run never interrupted."""
    config = settings_file(tmp_path, smollm2, write_dataset(tmp_path / "prompts.jsonl", 96), batch_size=8)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    environment = {**os.environ, "OMP_NUM_THREADS": "2"}
    finished = subprocess.run(infer_command(config, whole), cwd=REPO, capture_output=True, text=True, env=environment)
    assert finished.returncode == 0, finished.stderr[-2000:]

    killed = subprocess.Popen(infer_command(config, resumed), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=environment)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if resumed.exists() and resumed.read_text().count("\n") >= 40:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait()
    written_before_restart = resumed.read_text().count("\n")
    restarted = subprocess.run(infer_command(config, resumed), cwd=REPO, capture_output=True, text=True,
                               env=environment)
    assert restarted.returncode == 0, restarted.stderr[-2000:]

    measurements.append(f"dataset run: killed after {written_before_restart} of 96 lines; restarted: "
                        f"{restarted.stdout.strip().splitlines()[-1]}")
    assert 0 < written_before_restart < 96
    whole_lines, resumed_lines = read_lines(whole), read_lines(resumed)
    assert len(resumed_lines) == 96 and len({line["id"] for line in resumed_lines}) == 96
    by_id = {line["id"]: line for line in whole_lines}
    assert all(line == by_id[line["id"]] for line in resumed_lines)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_dataset"))


def test_batches_of_batch_size_and_a_cut_last_line_redone(tiny_llama, tmp_path):
    config = settings_file(tmp_path, tiny_llama, write_dataset(tmp_path / "prompts.jsonl", 7), batch_size=3)
    output = tmp_path / "out.jsonl"
    core.infer.main(LlamaRunner, ["--config", str(config), "--output-jsonl", str(output)], model_name="llama")
    lines = output.read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in lines] == [f"q{index}" for index in range(7)]
    assert "messages" in json.loads(lines[0]) and "prompt" in json.loads(lines[1])
    # A kill while the last batch was written leaves half a line: it is dropped and that batch redone.
    output.write_text("".join(lines[:6]) + lines[6][:10])
    core.infer.main(LlamaRunner, ["--config", str(config), "--output-jsonl", str(output)], model_name="llama")
    assert output.read_text() == "".join(lines)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_stream_prints_each_answer(tiny_llama, tmp_path, capsys, batch_size):
    config = settings_file(tmp_path, tiny_llama, "default", batch_size=batch_size, max_new_tokens=5)
    report = tmp_path / "report.json"
    core.infer.main(LlamaRunner, ["--config", str(config), "--stream", "--output-json", str(report)],
                    model_name="llama")
    printed = capsys.readouterr().out
    outputs = json.loads(report.read_text())["outputs"]
    for index, output in enumerate(outputs):
        assert (f"[{index}] {output}\n" if batch_size == 1 else f"[{index}] {output!r}\n") in printed
