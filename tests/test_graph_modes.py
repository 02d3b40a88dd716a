"""Graph modes on CPU: the inductor port matches HF eager and recompiles nothing after warm-up; modes a device
cannot run are refused; the profiler writes a trace of the model's ops."""

import json

import pytest

from conftest import run_cli
from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner
from scaffold.verify import verify_port


def test_inductor_port_matches_hf_eager_without_recompiles(tiny_gpt_oss, measurements):
    report = verify_port(GptOssRunner, tiny_gpt_oss, exe_mode="inductor")
    measurements.append(f"gpt_oss inductor: {report.summary()}")
    assert report.passed, report.summary()
    assert report.recompiles_after_warmup == 0


def test_ge_graph_without_torch_npu_names_the_available_modes(tmp_path):
    config = tmp_path / "ge.yaml"
    config.write_text("model_name: gpt_oss\nmodel_path: /tmp/unused\nexe_mode: ge_graph\n"
                      "model_config:\n  device: auto\n")
    result = run_cli("-m", "generated_models.gpt_oss.infer", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "exe_mode 'ge_graph' cannot run on cpu; modes available on cpu: eager, inductor" in result.stderr


def test_profiler_trace_holds_the_models_ops(tiny_gpt_oss, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = GptOssRunner({
        "model_name": "gpt_oss", "model_path": str(tiny_gpt_oss),
        "model_config": {"dtype": "float32", "device": "cpu", "enable_profiler": True},
        "data_config": {"input_max_len": 32, "max_new_tokens": 4, "batch_size": 1},
    })
    runner.init_model()
    runner.model_generate(["Hello"])
    traces = list((tmp_path / "results" / "gpt_oss" / "profiler").glob("*.json"))
    assert len(traces) == 1
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"prefill", "decode"} <= names
    assert any(name and name.startswith("aten::") and ("mm" in name or "linear" in name) for name in names)


@pytest.mark.parametrize("length, bucket", [(1, 16), (16, 16), (17, 32), (40, 64), (64, 64)])
def test_graph_modes_pad_prompts_to_buckets(tiny_gpt_oss, length, bucket):
    runner = GptOssRunner({"model_name": "gpt_oss", "model_path": str(tiny_gpt_oss), "exe_mode": "inductor",
                           "data_config": {"input_max_len": 50}})
    assert runner.prefill_length(length) == min(bucket, 50)
