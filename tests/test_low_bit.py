"""Low-bit linears on CPU: `weight_quant: int4 | int8` at load, and a GGUF's Q4_1 / Q8_0 codes kept as they are.

A low-bit port is compared with HF eager running the weights the kernels multiply by, turned back to float: the
teacher-forced logit error is measured, and greedy tokens may differ only where HF's top-2 gap is below it.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from core.gguf_blocks import decode_blocks
from core.gguf_import import import_gguf, packaged_smollm2_gguf
from core.quantization import low_bit
from core.quantization.int_groups import PackedIntGroups, dequantize_groups
from core.quantization.low_bit import AVX512_KERNEL, TORCH_INT4_KERNEL
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.tiny_quantized import write_low_bit_reference
from scaffold.verify import DistributedCase, build_tiny_checkpoint, verify_port, verify_port_distributed_cases

SMOLLM2_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "def fibonacci(n):",
                   "Why is the sky blue?")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_low_bit"))


def describe(report) -> str:
    gaps = ", ".join(f"{mismatch.hf_top2_gap:.3f}" for mismatch in report.mismatches) or "none"
    return (f"teacher-forced max |port - HF| {report.max_abs_logit_diff:.3g}; greedy rows differing "
            f"{len(report.mismatches)} (HF top-2 gaps there: {gaps})")


def assert_differs_only_at_near_ties(report):
    assert all(mismatch.hf_top2_gap < report.max_abs_logit_diff for mismatch in report.mismatches), describe(report)


@pytest.mark.parametrize("scheme,kernel", [("int4", None), ("int8", None), ("int8", TORCH_INT4_KERNEL)])
def test_weight_quant_port_matches_hf_on_the_dequantized_weights(tiny_llama, tmp_path, scheme, kernel, measurements,
                                                                  monkeypatch):
    if kernel is not None:  # what a CPU without AVX-512 BF16 runs: torch's int8 kernel
        monkeypatch.setattr(low_bit, "int_groups_kernel_for", lambda group: kernel)
    reference = write_low_bit_reference(tiny_llama, tmp_path / "reference", scheme)
    settings = {"model_config": {"dtype": "float32", "weight_quant": scheme}}
    report = verify_port(LlamaRunner, tiny_llama, tolerance=1.0, settings_overrides=settings,
                         reference_checkpoint=reference)
    float_port = verify_port(LlamaRunner, tiny_llama, tolerance=1.0, reference_checkpoint=reference)
    measurements.append(f"llama weight_quant {scheme} ({kernel or 'default kernel'}, fp32 model, bf16 activations) vs "
                        f"HF on its dequantized "
                        f"weights: {describe(report)}; the float port is {float_port.max_abs_logit_diff:.3g} away; "
                        f"parameter bytes {report.parameter_bytes_per_rank} vs float {float_port.parameter_bytes_per_rank}")
    assert_differs_only_at_near_ties(report)
    # The reference really is the quantized model: the float port is far from it, the low-bit port close.
    assert report.max_abs_logit_diff < float_port.max_abs_logit_diff / 2
    assert report.parameter_bytes_per_rank < float_port.parameter_bytes_per_rank * (0.45 if scheme == "int4" else 0.6)


def test_int4_at_tp2_quantizes_each_ranks_shard_like_the_whole(tiny_llama, tmp_path, measurements):
    reference = write_low_bit_reference(tiny_llama, tmp_path / "reference", "int4")
    case = DistributedCase(tiny_llama, settings={"model_config": {"dtype": "float32", "weight_quant": "int4"}},
                           reference_checkpoint=reference)
    report = verify_port_distributed_cases("generated_models.llama.runner_llama:LlamaRunner", {"int4": case})["int4"]
    measurements.append(f"llama weight_quant int4 at TP=2 vs HF on the dequantized weights: {describe(report)}")
    assert_differs_only_at_near_ties(report)
    assert report.max_abs_logit_diff < 0.1


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_to_the_values_gguf_dequantizes(kind):
    quant_type = GGMLQuantizationType[kind]
    values = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(values, quant_type)
    parts = decode_blocks(kind, raw.reshape(48, 96 // 32, -1))
    ours = dequantize_groups(parts["codes"], parts["scales"], parts.get("mins"))
    assert torch.equal(ours, torch.from_numpy(dequantize(raw, quant_type)))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_kept_q4_0_blocks_run_on_the_symmetric_kernel_and_multiply_by_the_files_values(kind):
    """Q4_0's scale · (code − 8) reads no mins on the AVX-512 kernel: 288 bytes a block of 16 rows, not 320."""
    values = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    parts = decode_blocks(kind, quantize(values, GGMLQuantizationType[kind]).reshape(48, 96 // 32, -1))
    weight = PackedIntGroups(torch.nn.Parameter(torch.empty(48, 96)), 32)
    weight.store(parts)
    assert weight.symmetric == (kind == "Q4_0" and weight.kernel == AVX512_KERNEL)
    x = torch.randn(3, 96).bfloat16().float()
    expected = x @ dequantize_groups(parts["codes"], parts["scales"], parts["mins"]).T
    torch.testing.assert_close(weight(x), expected, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_kept(smollm2):
    checkpoint, _ = import_gguf(packaged_smollm2_gguf(), smollm2.parent / "SmolLM2-135M-Instruct-q4_1",
                                keep_quantized=True)
    return checkpoint


def test_gguf_q4_1_kept_runs_its_own_codes_and_answers_paris(smollm2, smollm2_kept, measurements):
    """The reference is the file dequantized (the plain import): the port multiplies by the same codes, with its
    kernel's bfloat16 scales and activations."""
    settings = {"model_config": {"dtype": "bfloat16", "quant_weight_mode": "packed"}}
    report = verify_port(LlamaRunner, smollm2_kept, SMOLLM2_PROMPTS, max_new_tokens=32, tolerance=1.0,
                         settings_overrides=settings, reference_checkpoint=smollm2)
    measurements.append(f"SmolLM2 Q4_1 GGUF kept quantized (packed, bf16) vs HF on the file dequantized, 4 prompts x "
                        f"32 tokens: {describe(report)}; parameter bytes {report.parameter_bytes_per_rank}")
    assert_differs_only_at_near_ties(report)
    assert report.parameter_bytes_per_rank < 0.5 * 538e6

    runner = LlamaRunner({"model_name": "llama", "model_path": str(smollm2_kept), "model_config": {
        "dtype": "bfloat16", "device": "cpu", "quant_weight_mode": "packed", "tokenizer_mode": "chat"},
        "data_config": {"input_max_len": 64, "max_new_tokens": 12}})
    runner.init_model()
    answer = runner.model_generate([[{"role": "user", "content": "What is the capital of France?"}]]).outputs[0]
    assert "Paris" in answer, answer


def test_int4_in_inductor_matches_the_reference_with_one_decode_graph(tiny_llama, tmp_path, measurements):
    """Low-bit graphs compile without freezing, so inductor's FX-graph cache can serve the next process."""
    from torch._dynamo.utils import counters

    reference = write_low_bit_reference(tiny_llama, tmp_path / "reference", "int4")
    counters.clear()
    report = verify_port(LlamaRunner, tiny_llama, tolerance=1.0, exe_mode="inductor", reference_checkpoint=reference,
                         settings_overrides={"model_config": {"dtype": "float32", "weight_quant": "int4"}})
    measurements.append(f"llama weight_quant int4 inductor: {describe(report)}; "
                        f"{report.recompiles_after_warmup} recompiles after warm-up")
    assert_differs_only_at_near_ties(report)
    assert report.max_abs_logit_diff < 0.1
    assert report.recompiles_after_warmup == 0
    assert "fxgraph_cache_bypass" not in counters["inductor"]
