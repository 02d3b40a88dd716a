"""Graph modes on CPU: the inductor port matches HF eager and recompiles nothing after warm-up; modes a device
cannot run are refused; the profiler writes a trace of the model's ops."""

import json
import logging

import pytest
import torch

from conftest import run_cli
from core.backends.cpu import CpuBackend
from core.backends.repeated_blocks import repeated_blocks
from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner
from generated_models.falcon_h1.runner_falcon_h1 import FalconH1Runner
from generated_models.granitemoehybrid.runner_granitemoehybrid import GraniteMoeHybridRunner
from generated_models.qwen3_5_text.runner_qwen3_5_text import Qwen3_5Runner
from generated_models.qwen3_next.runner_qwen3_next import Qwen3NextRunner
from scaffold.verify import DEFAULT_PROMPTS, build_tiny_checkpoint, verification_settings, verify_port

# Gated DeltaNet (Qwen3-Next, Qwen3.5) and Mamba2 (Granite 4, Falcon-H1) layers after full attention.
HYBRID_PORTS = {"qwen3_next": Qwen3NextRunner, "qwen3_5_text": Qwen3_5Runner,
                "granitemoehybrid": GraniteMoeHybridRunner, "falcon_h1": FalconH1Runner}


def test_inductor_port_matches_hf_eager_without_recompiles(tiny_gpt_oss, measurements):
    report = verify_port(GptOssRunner, tiny_gpt_oss, exe_mode="inductor")
    measurements.append(f"gpt_oss inductor: {report.summary()}")
    assert report.passed, report.summary()
    assert report.recompiles_after_warmup == 0


@pytest.mark.parametrize("name", HYBRID_PORTS)
def test_hybrid_port_in_inductor_matches_hf_eager_without_recompiles(name, tmp_path, measurements):
    """Conv and recurrent states sit in the static cache beside the KV buffers: the compiled prefill starts them
    from zero for each prompt batch, the one decode graph advances them in place, and the warm-up leaves nothing
    behind. Compiled untuned (compile_autotune: false), which proves the same graphs in seconds."""
    report = verify_port(HYBRID_PORTS[name], build_tiny_checkpoint(name, tmp_path), exe_mode="inductor",
                         settings_overrides={"model_config": {"compile_autotune": False}})
    measurements.append(f"{name} inductor: {report.summary()}")
    assert report.passed, report.summary()
    assert report.recompiles_after_warmup == 0


def test_inductor_samples_with_one_decode_graph(tiny_gpt_oss, measurements):
    """Sampling runs on the logits outside the compiled step: after warm-up nothing recompiles, and the seeded
    draws repeat run after run. Greedy decoding compiles its own step (tokens chosen inside it) on first use."""
    runner = GptOssRunner(verification_settings(GptOssRunner, tiny_gpt_oss, 3, 24, {"exe_mode": "inductor"}))
    runner.init_model()
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 5}
    first = runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, sampling=sampling, ignore_eos=True)
    again = runner.model_generate(list(DEFAULT_PROMPTS), sampling=sampling, ignore_eos=True)
    greedy = runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, ignore_eos=True)
    sampled_after_greedy = runner.model_generate(list(DEFAULT_PROMPTS), sampling=sampling, ignore_eos=True)
    measurements.append(f"gpt_oss inductor sampling: {first.timing['recompiles_after_warmup']} recompiles after "
                        f"warm-up, then {again.timing['recompiles_after_warmup']} (sampled), "
                        f"{greedy.timing['recompiles_after_warmup']} (greedy after its warm-up) and "
                        f"{sampled_after_greedy.timing['recompiles_after_warmup']} (sampled again)")
    assert first.timing["recompiles_after_warmup"] == again.timing["recompiles_after_warmup"] == 0
    assert greedy.timing["recompiles_after_warmup"] == sampled_after_greedy.timing["recompiles_after_warmup"] == 0
    assert first.output_token_ids == again.output_token_ids == sampled_after_greedy.output_token_ids
    assert first.output_token_ids != greedy.output_token_ids


def test_recompile_count_sees_a_graph_compiled_after_warm_up(tiny_gpt_oss):
    """The count every "0 recompiles" assertion relies on: a batch size the warm-up did not run compiles a step of
    its own, and the measured run reports it."""
    settings = {"exe_mode": "inductor", "model_config": {"compile_autotune": False}}
    runner = GptOssRunner(verification_settings(GptOssRunner, tiny_gpt_oss, 3, 4, settings))
    runner.init_model()
    runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, ignore_eos=True)
    assert runner.model_generate(list(DEFAULT_PROMPTS)[:2], ignore_eos=True).timing["recompiles_after_warmup"] >= 1

class ShiftedDecodePositions(GptOssRunner):
    """Notes whether each `model_input_prepare` call runs eagerly or is being compiled, and moves every decoded
    token one position on."""

    eager_prepares: list[bool] = []

    def model_input_prepare(self, input_dict):
        ShiftedDecodePositions.eager_prepares.append(not torch.compiler.is_compiling())
        model_inputs = super().model_input_prepare(input_dict)
        if model_inputs["input_ids"].shape[1] == 1:
            model_inputs["position_ids"] = model_inputs["position_ids"] + 1
        return model_inputs


def test_decode_graph_runs_the_runners_own_input_prepare(tiny_gpt_oss):
    """`model_input_prepare` is traced into the compiled decode step: after warm-up the loop runs it eagerly only
    for the prefill, and what a subclass changes in it still reaches every compiled step."""
    settings = {"exe_mode": "inductor", "model_config": {"compile_autotune": False}}
    runner = ShiftedDecodePositions(verification_settings(GptOssRunner, tiny_gpt_oss, 3, 8, settings))
    runner.init_model()
    shifted = runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, ignore_eos=True)
    ShiftedDecodePositions.eager_prepares.clear()
    again = runner.model_generate(list(DEFAULT_PROMPTS), ignore_eos=True)
    assert ShiftedDecodePositions.eager_prepares.count(True) == 1
    assert again.output_token_ids == shifted.output_token_ids
    assert again.timing["recompiles_after_warmup"] == 0
    plain = GptOssRunner(verification_settings(GptOssRunner, tiny_gpt_oss, 3, 8, {"exe_mode": "eager"}))
    plain.init_model()
    assert plain.model_generate(list(DEFAULT_PROMPTS), ignore_eos=True).output_token_ids != shifted.output_token_ids


def test_greedy_rows_stop_at_a_stop_token_chosen_inside_the_compiled_step(tiny_gpt_oss):
    """Greedy decoding in a graph mode picks each token inside the compiled step: a row ends at its first stop
    token, and the others go on exactly as they would without it."""
    settings = {"exe_mode": "inductor", "model_config": {"compile_autotune": False}}
    runner = GptOssRunner(verification_settings(GptOssRunner, tiny_gpt_oss, 3, 8, settings))
    runner.init_model()
    free = runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, ignore_eos=True).output_token_ids
    stop = free[0][2]
    stopped = runner.model_generate(list(DEFAULT_PROMPTS), sampling={"eos_token_id": (stop,)})
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert stopped.output_token_ids == expected and len(expected[0]) <= 3
    assert stopped.timing["recompiles_after_warmup"] == 0


class Scaled(torch.nn.Module):
    def __init__(self, scale: float, graph_break: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.scale = scale
        self.graph_break = graph_break

    def forward(self, x):
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.linear(x) * self.scale


def test_compiled_models_of_one_class_never_share_graphs():
    """The modules' guards are skipped, so each model's graphs must be its own: a second model of the same class
    with another constant (and other weights) gets its own answer, not the first model's graph."""
    x = torch.randn(2, 4)
    first, second = Scaled(1.0), Scaled(3.0)
    compiled = [CpuBackend().compile(model.forward, "inductor", autotune=False) for model in (first, second)]
    with torch.inference_mode():
        results = [run(x) for run in compiled]
        expected = [first(x), second(x)]
    assert all(torch.allclose(result, want, atol=1e-6) for result, want in zip(results, expected))


class Stack(torch.nn.Module):
    """Identical blocks, each with its own weights and scale, and a nested list that is part of each block."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(Scaled(float(index + 1)) for index in range(4))
        for layer in self.layers:
            layer.parts = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_repeated_blocks_compile_once_and_each_keeps_its_weights():
    """The decoder-layer stack is marked as one compile region (not the lists inside a layer); the compiled stack
    still runs every layer with its own weights and constants."""
    model, x = Stack(), torch.randn(2, 4)
    assert repeated_blocks(model) == list(model.layers)
    with torch.inference_mode():
        expected = model(x)
        backend = CpuBackend()
        backend.prepare_for_graphs(model, "inductor", torch.float32, autotune=False)
        compiled = backend.compile(model.forward, "inductor", autotune=False)
        assert torch.allclose(compiled(x), expected, atol=1e-5)


def test_tiny_port_marks_its_decoder_layers(tiny_gpt_oss):
    runner = GptOssRunner(verification_settings(GptOssRunner, tiny_gpt_oss, 1, 4, {"exe_mode": "eager"}))
    runner.init_model()
    assert repeated_blocks(runner.model) == list(runner.model.model.layers)


def test_a_forward_with_a_graph_break_still_compiles_and_keeps_its_guards(caplog):
    model, x = Scaled(2.0, graph_break=True), torch.randn(2, 4)
    compiled = CpuBackend().compile(model.forward, "inductor", autotune=False)
    with caplog.at_level(logging.INFO, logger="core.backends.base"), torch.inference_mode():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert "does not compile to one graph: modules stay guarded" in caplog.text


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
def test_graph_modes_pad_prompts_to_buckets(tiny_gpt_oss, length, bucket, monkeypatch):
    runner = GptOssRunner({"model_name": "gpt_oss", "model_path": str(tiny_gpt_oss), "exe_mode": "inductor",
                           "data_config": {"input_max_len": 50}})
    assert runner.prefill_length(length) == length  # the CPU backend prefills eagerly, at the prompt's length
    monkeypatch.setattr(runner.backend, "compiles_prefill", True)  # as CUDA and NPU graph modes do
    assert runner.prefill_length(length) == min(bucket, 50)
