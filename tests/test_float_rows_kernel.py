"""Float weights on CPU graphs: our AVX-512 kernel (core/kernels/float_rows_avx512.cpp) multiplies the decode step's
few activation rows by bfloat16 or float32 weights laid out for it, and the graph stays cacheable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core.kernels
from core.backends.float_rows import FloatRowsWeight, float_linears_on_kernel
from core.kernels.layout import float_rows_layout
from core.layers.linear import ColumnParallelLinear
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import build_tiny_checkpoint, verify_port

pytestmark = pytest.mark.skipif(core.kernels.cpu_kernels() is not None,
                                reason=f"AVX-512 kernels: {core.kernels.cpu_kernels()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,columns", [(16, 2), (48, 64), (96, 576), (32, 1536)])
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_products_equal_the_float32_products(dtype, rows, columns, batch):
    generator = torch.Generator().manual_seed(rows * columns + batch)
    x = torch.randn(batch, columns, generator=generator).to(dtype)
    weight = torch.randn(rows, columns, generator=generator).to(dtype)
    product = torch.ops.recipes_scaffold.float_rows_mm(x, float_rows_layout(weight))
    assert product.dtype == dtype and product.shape == (batch, rows)
    # Products of two bfloat16s are exact in float32: only the float32 sums' order and the final rounding differ.
    expected = (x.double() @ weight.double().T).to(dtype)
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(product, expected, **tolerance)


def test_a_layer_multiplies_a_prompts_rows_and_other_dtypes_through_the_kernel():
    weight = torch.randn(48, 64).bfloat16()
    laid_out = FloatRowsWeight(weight, in_place=False)
    prompt = torch.randn(2, 40, 64).bfloat16()
    torch.testing.assert_close(laid_out(prompt), F.linear(prompt, weight), rtol=1e-2, atol=1e-2)
    assert laid_out(prompt.float()).dtype == torch.float32


def test_wrong_inputs_are_refused_with_what_is_expected():
    laid_out = float_rows_layout(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="contiguous 2-d bfloat16 or float32"):
        torch.ops.recipes_scaffold.float_rows_mm(torch.randn(1, 64).half(), laid_out.half())
    with pytest.raises(RuntimeError, match="rows a multiple of 16"):
        torch.ops.recipes_scaffold.float_rows_mm(torch.randn(1, 64), laid_out[:64 * 8])
    with pytest.raises(RuntimeError, match="multiple of 2 inputs"):
        torch.ops.recipes_scaffold.float_rows_mm(torch.randn(1, 63).bfloat16(), torch.zeros(16 * 63).bfloat16())


def test_layers_that_do_not_fit_keep_their_weight_and_say_why():
    model = nn.ModuleDict({"fits": ColumnParallelLinear(64, 32, bias=False),
                           "odd_rows": ColumnParallelLinear(64, 24, bias=False),
                           "float16": ColumnParallelLinear(64, 32, bias=False, dtype=torch.float16)})
    kept = float_linears_on_kernel(model)
    assert isinstance(model["fits"].weight, FloatRowsWeight)
    assert kept == {"odd_rows": "24 output rows are not a multiple of 16",
                    "float16": "torch.float16 weights (the kernel takes torch.bfloat16 or torch.float32)"}
    assert isinstance(model["odd_rows"].weight, nn.Parameter)


def test_a_weight_tied_to_an_embedding_is_laid_out_beside_it():
    head = ColumnParallelLinear(64, 32, bias=False)
    embedding = nn.Embedding(32, 64)
    embedding.weight = head.weight
    original = head.weight.detach().clone()
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    float_linears_on_kernel(model)
    assert torch.equal(embedding.weight, original)
    assert head.weight.laid_out.untyped_storage().data_ptr() != embedding.weight.untyped_storage().data_ptr()
    x = torch.randn(2, 64)
    torch.testing.assert_close(head(x), F.linear(x, original), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_float_rows"))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_float_ports_compile_on_the_kernel_into_a_cacheable_graph(tiny_llama, dtype, tolerance, measurements):
    """The default for float weights on a CPU with the kernels: no freezing, so inductor's FX-graph cache serves the
    next process. bfloat16 against HF's float32 logits: the rounding of bfloat16 itself (the port in eager, on torch's
    GEMM: 0.038 here, this kernel 0.045)."""
    from torch._dynamo.utils import counters

    counters.clear()
    report = verify_port(LlamaRunner, tiny_llama, exe_mode="inductor", tolerance=tolerance,
                         settings_overrides={"model_config": {"dtype": dtype}})
    measurements.append(f"llama {dtype} inductor on the float-rows kernel: max |port - HF| "
                        f"{report.max_abs_logit_diff:.3g}, greedy rows differing {len(report.mismatches)}, "
                        f"{report.recompiles_after_warmup} recompiles after warm-up")
    assert report.passed, report
    assert "fxgraph_cache_bypass" not in counters["inductor"]
