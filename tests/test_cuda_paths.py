"""What the CUDA backend does differently from the CPU's, run here on the CPU: the decode attention its graphs use,
the argmax its sampler uses, the experts it switches for CUDA graphs. bench/device_check.py proves them on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from core.backends.cpu import CpuBackend
from core.backends.cuda import CudaBackend
from core.decode_attention import CPU_DECODE, GROUPED_DECODE, grouped_decode_attention
from core.kernels import cpu_kernels
from core.sampling import chunked_argmax
from generated_models.llama.runner_llama import LlamaRunner
from generated_models.qwen3_moe.runner_qwen3_moe import Qwen3MoeRunner
from scaffold.verify import build_tiny_checkpoint, verify_port


class GroupedAttention(torch.nn.Module):
    num_key_value_groups = 4


def attention_inputs(dtype: torch.dtype, queries: int = 1, value_dim: int = 16):
    torch.manual_seed(0)
    query = torch.randn(3, 8, queries, 16, dtype=dtype)
    key, value = torch.randn(3, 2, 20, 16, dtype=dtype), torch.randn(3, 2, 20, value_dim, dtype=dtype)
    mask = torch.zeros(3, 1, queries, 24, dtype=dtype)  # the cache's mask may be wider than the keys passed
    mask[0, ..., :5] = mask[..., 15:] = torch.finfo(dtype).min  # left padding, and slots not yet written
    return query, key, value, mask


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("value_dim", [16, 8])
def test_grouped_decode_attention_equals_sdpa(dtype, tolerance, value_dim):
    query, key, value, mask = attention_inputs(dtype, value_dim=value_dim)
    grouped, _ = grouped_decode_attention(GroupedAttention(), query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(GroupedAttention(), query, key, value, mask[..., :20], scaling=0.3)
    assert grouped.shape == reference.shape == (3, 1, 8, value_dim)
    assert (grouped.float() - reference.float()).abs().max() <= tolerance


def test_grouped_decode_attention_hands_prompts_to_sdpa():
    query, key, value, mask = attention_inputs(torch.float32, queries=4)
    grouped, _ = grouped_decode_attention(GroupedAttention(), query, key, value, mask[..., :20])
    reference, _ = sdpa_attention_forward(GroupedAttention(), query, key, value, mask[..., :20])
    assert torch.equal(grouped, reference)


def test_cuda_decode_steps_replace_sdpa_only():
    assert CudaBackend().decode_attention("sdpa") == GROUPED_DECODE
    assert CudaBackend().decode_attention("eager") == "eager"  # gpt_oss's sinks live in its eager attention
    assert CpuBackend().decode_attention("sdpa") == (CPU_DECODE if cpu_kernels() is None else "eager")


def test_a_port_compiled_with_the_grouped_decode_attention_matches_hf(tmp_path, monkeypatch):
    """The CUDA backend's decode attention traced by inductor (here into C++), inside a port's decode graph."""
    monkeypatch.setattr(CpuBackend, "decode_attention", lambda self, model_attention: GROUPED_DECODE)
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "tiny-llama")
    report = verify_port(LlamaRunner, checkpoint, max_new_tokens=8, exe_mode="inductor",
                         settings_overrides={"model_config": {"compile_autotune": False}})
    assert report.passed, report.summary()


def test_chunked_argmax_picks_the_first_maximum_as_argmax_does():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (5000, 128256):
            logits = torch.randn(6, vocab).to(dtype)
            logits[1] = 1.0  # every index ties
            logits[2, 100] = logits[2, vocab - 7] = 50  # a tie across chunks
            logits[3, -1] = 99  # the maximum in the padded last chunk
            assert torch.equal(chunked_argmax(logits), logits.float().argmax(dim=-1))


def test_cuda_graphs_get_experts_that_stay_on_the_device(tmp_path, caplog):
    checkpoint = build_tiny_checkpoint("qwen3_moe", tmp_path / "tiny-qwen3_moe")
    runner = Qwen3MoeRunner({
        "model_name": "qwen3_moe", "model_path": str(checkpoint),
        "model_config": {"dtype": "float32", "device": "cpu"},
        "data_config": {"input_max_len": 32, "max_new_tokens": 4, "batch_size": 1},
    })
    runner.init_model()
    config = runner.model.config
    assert config._experts_implementation == "grouped_mm"
    inputs = torch.tensor([[5, 9, 30, 2]])
    with torch.inference_mode():
        grouped = runner.model(input_ids=inputs).logits
    CudaBackend().prepare_for_graphs(runner.model, "inductor", torch.float32)
    CudaBackend().prepare_for_graphs(runner.model, "cuda_graph", torch.bfloat16)
    assert config._experts_implementation == "grouped_mm"  # native grouped_mm: capturable
    with caplog.at_level(logging.INFO, logger="core.backends.cuda"):
        CudaBackend().prepare_for_graphs(runner.model, "cuda_graph", torch.float32)
    assert config._experts_implementation == "batched_mm"
    assert "experts run batched_mm in CUDA graphs" in caplog.text
    with torch.inference_mode():
        batched = runner.model(input_ids=inputs).logits
    assert (batched - grouped).abs().max() < 1e-5
