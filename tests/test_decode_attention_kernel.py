"""The CPU decode-attention kernel (core/kernels/decode_attention_avx512.cpp, reached through the `cpu_decode`
attention implementation) against softmax attention in float64: grouped KV heads, padded and fully masked rows,
a mask longer than the cache, per-head masks; calls it does not cover run the model's own eager attention."""

import pytest
import torch

import core.kernels
from core.backends.cpu import CpuBackend
from core.decode_attention import CPU_DECODE, cpu_decode_attention
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import build_tiny_checkpoint, verify_port

pytestmark = pytest.mark.skipif(core.kernels.cpu_kernels() is not None,
                                reason=f"AVX-512 kernels: {core.kernels.cpu_kernels()}")


def reference(query, key, value, mask, scale):
    group = query.shape[1] // key.shape[1]
    keys, values = (part.double().repeat_interleave(group, dim=1) for part in (key, value))
    scores = query.double() @ keys.transpose(-1, -2) * scale + mask[..., : key.shape[2]].double()
    return (scores.softmax(dim=-1) @ values).transpose(1, 2)


def attention_inputs(dtype, batch, heads, kv_heads, slots, head_dim, mask_heads=1, seed=0,
                     value_dim=None):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(dtype)
    # keys as a view into a larger cache (one more row), as a serving batch's rows are
    key = torch.randn(batch + 1, kv_heads, slots, head_dim, generator=generator).to(dtype)[1:]
    value = torch.randn(batch, kv_heads, slots, value_dim or head_dim, generator=generator).to(dtype)
    visible = torch.rand(batch, mask_heads, 1, slots + 3, generator=generator) > 0.3
    visible[0] = False  # a padding row: every slot masked, as HF's masks leave it
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return query, key, value, mask


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("batch,heads,kv_heads,slots,head_dim,mask_heads,value_dim",
                         [(1, 9, 3, 64, 64, 1, 64), (8, 9, 3, 70, 64, 1, 64), (2, 4, 4, 5, 128, 4, 128),
                          (3, 8, 2, 33, 32, 1, 32), (2, 12, 2, 40, 48, 12, 48), (2, 6, 3, 21, 64, 1, 32)])
def test_decode_attention_matches_softmax_attention(dtype, tolerance, batch, heads, kv_heads, slots, head_dim,
                                                    mask_heads, value_dim):
    query, key, value, mask = attention_inputs(dtype, batch, heads, kv_heads, slots, head_dim, mask_heads,
                                               value_dim=value_dim)
    output, weights = cpu_decode_attention(torch.nn.Module(), query, key, value, mask, scaling=head_dim**-0.5)
    assert weights is None and output.shape == (batch, 1, heads, value_dim) and output.dtype == dtype
    expected = reference(query, key, value, mask, head_dim**-0.5)
    assert (output.double() - expected).abs().max().item() < tolerance


def test_calls_the_kernel_does_not_cover_run_the_models_eager_attention(monkeypatch):
    """Sinks (gpt-oss's s_aux) and prompts are not plain softmax attention over one query: the module's own
    eager_attention_forward answers them."""
    import generated_models.gpt_oss.modeling_gpt_oss as gpt_oss

    seen = []
    monkeypatch.setattr(gpt_oss, "eager_attention_forward",
                        lambda *args, **kwargs: seen.append(kwargs) or ("eager", None))
    module = gpt_oss.GptOssAttention.__new__(gpt_oss.GptOssAttention)
    query, key, value, mask = attention_inputs(torch.float32, 1, 4, 2, 8, 32)
    assert cpu_decode_attention(module, query, key, value, mask, s_aux=torch.zeros(4))[0] == "eager"
    prompt = torch.randn(1, 4, 3, 32)
    assert cpu_decode_attention(module, prompt, key, value, mask[..., :1, :])[0] == "eager"
    assert len(seen) == 2 and "s_aux" in seen[0]


def test_a_port_decoding_on_the_kernel_matches_hf(tmp_path):
    """SmolLM2's family with the CPU backend's default decode attention, inside the compiled decode step."""
    assert CpuBackend().decode_attention("sdpa") == CPU_DECODE
    checkpoint = build_tiny_checkpoint("llama", tmp_path / "tiny-llama")
    report = verify_port(LlamaRunner, checkpoint, max_new_tokens=8, exe_mode="inductor",
                         settings_overrides={"model_config": {"compile_autotune": False}})
    assert report.passed, report.summary()
