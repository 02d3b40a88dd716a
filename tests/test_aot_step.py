"""The CPU's greedy decode step compiled ahead of time (AOTInductor, core/backends/aot_step.py): the same tokens as
the eager port, its library kept and loaded by the next runner without compiling, torch.compile's step where it
cannot be built or is not wanted."""

import logging
import zipfile

import pytest
import torch

from core.backends import aot_step
from core.backends.aot_step import AotGreedyStep
from core.kernels import cpu_kernels
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import DEFAULT_PROMPTS, build_tiny_checkpoint, verification_settings

NEW_TOKENS = 12
AHEAD = {"exe_mode": "inductor"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_aot"))


@pytest.fixture(scope="module")
def eager_tokens(tiny_llama):
    return generate(tiny_llama, {"exe_mode": "eager"})[1]


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(aot_step, "cache_dir", lambda: tmp_path / "aot_steps")
    return tmp_path / "aot_steps"


def generate(checkpoint, overrides):
    runner = LlamaRunner(verification_settings(LlamaRunner, checkpoint, len(DEFAULT_PROMPTS), NEW_TOKENS, overrides))
    runner.init_model()
    result = runner.model_generate(list(DEFAULT_PROMPTS), ignore_eos=True)
    return runner, result.output_token_ids


def built_steps(runner) -> list:
    assert isinstance(runner.greedy_decode_forward, AotGreedyStep)
    return list(runner.greedy_decode_forward.steps.values())


def wrapper_source(package) -> str:
    with zipfile.ZipFile(package) as archive:
        return "".join(archive.read(name).decode() for name in archive.namelist() if name.endswith(".wrapper.cpp"))


def test_the_step_compiled_ahead_of_time_decodes_the_eager_ports_tokens(tiny_llama, eager_tokens, package_dir):
    runner, tokens = generate(tiny_llama, AHEAD)
    steps = built_steps(runner)
    assert len(steps) == 1 and steps[0] is not None
    assert tokens == eager_tokens
    # each step's positions, cache slots and mask reach the next one: the rows do not repeat one token
    assert all(len(set(row)) > 1 for row in tokens)
    [package] = package_dir.glob("*.pt2")
    if cpu_kernels() is None:
        # our kernels are called through their C entry points, none through the proxy executor's boxed dispatch
        source = wrapper_source(package)
        assert "aoti_torch_cpu_float_rows_mm(" in source and "aoti_torch_cpu_row_argmax(" in source
        assert "aoti_torch_cpu_decode_attention(" in source
        assert "proxy_executor_call_function(" not in source


def test_a_second_runner_loads_the_kept_library_without_compiling(tiny_llama, eager_tokens, package_dir,
                                                                 monkeypatch):
    generate(tiny_llama, AHEAD)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    runner, tokens = generate(tiny_llama, AHEAD)
    assert built_steps(runner)[0] is not None
    assert tokens == eager_tokens


def test_a_step_that_does_not_export_stays_on_torch_compile(tiny_llama, eager_tokens, package_dir, monkeypatch,
                                                            caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("this step cannot be exported\nsecond line")

    monkeypatch.setattr(torch.export, "export", refuse)
    with caplog.at_level(logging.WARNING, logger="core.backends.aot_step"):
        runner, tokens = generate(tiny_llama, AHEAD)
    assert built_steps(runner) == [None]
    assert tokens == eager_tokens
    assert ("the decode step stays on torch.compile: AOTInductor could not compile it (this step cannot be "
            "exported)") in caplog.text
    assert not package_dir.exists()


def test_aot_decode_step_false_keeps_torch_compiles_step(tiny_llama, eager_tokens, package_dir):
    runner, tokens = generate(tiny_llama, {"exe_mode": "inductor", "model_config": {"aot_decode_step": False}})
    assert not isinstance(runner.greedy_decode_forward, AotGreedyStep)
    assert tokens == eager_tokens
    assert not package_dir.exists()
