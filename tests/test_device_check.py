"""bench/device_check.py is what a GPU session runs, once, with minutes of device time: here it runs end to end on
the CPU (tiny models, eager), so that it cannot rot between device sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_device_check_runs_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "report"
    result = run_check("--device", "cpu", "--models", "llama", "gpt_oss", "--modes", "eager", "--speed-model", "tiny",
                       "--batches", "1", "2",
                       "--new-tokens", "16", "--rounds", "3", "--profile", "--model-attention-mode", "eager",
                       "--overlap", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "device_check.json").read_text())
    cases = {(row["model"], row["dtype"]): row for row in report["verify"]}
    assert set(cases) == {(model, dtype) for model in ("llama", "gpt_oss") for dtype in ("float32", "bfloat16")}
    assert all(row["passed"] for row in cases.values())
    assert cases["llama", "float32"]["tolerance"] == 1e-4
    # bf16's tolerance is three times HF's own bf16 error on the same tokens, and that error is real.
    bf16 = cases["llama", "bfloat16"]
    assert bf16["hf_bf16_error"] > 1e-3 and bf16["tolerance"] == max(1e-4, 3 * bf16["hf_bf16_error"])
    speed = {(row["batch"], row["contender"]): row for row in report["speed"]}
    contenders = ("HF eager", "HF static+compile", "port eager", "port eager (sdpa decode)")
    assert set(speed) == {(batch, name) for batch in (1, 2) for name in contenders}
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0 for row in speed.values())
    assert speed[1, "HF eager"]["vs_hf_eager"] == 1.0 and 0 < speed[1, "port eager"]["roofline_fraction"] < 1
    assert report["speed_setup"]["read_gb_per_s"] > 0
    table = (out / "device_check.md").read_text()
    assert "| llama | eager | bfloat16 |" in table and "| 2 | port eager |" in table
    profiles = sorted(out.glob("profile_port_eager*_batch1.txt"))
    assert len(profiles) == 1 and "aten::" in profiles[0].read_text()
    # Libraries log to the file, not the terminal: the script's own progress lines only, one per case.
    lines = result.stdout.splitlines()
    assert all(line.startswith(("device_check on ", "verify ", "speed", "waited ", "wrote ")) for line in lines)
    assert sum(line.startswith("verify ") for line in lines) == 4
    assert "===== gpt_oss" in (out / "verify_workers.log").read_text()  # --overlap: a process per model
    assert "Loading weights" not in result.stderr


def test_device_check_without_the_device_says_what_to_use():
    if torch.cuda.is_available():
        return
    result = run_check("--device", "cuda")
    assert result.returncode == 2
    assert "--device cuda: no cuda device is available here; use --device cpu" in result.stderr


def test_device_check_names_the_modes_the_device_has(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import device_check

    with pytest.raises(SystemExit) as stopped:
        device_check.main(["--device", "cpu", "--modes", "cuda_graph"])
    assert stopped.value.code == 2
    assert "mode cuda_graph does not run on cpu; its modes: eager, inductor" in capsys.readouterr().err
