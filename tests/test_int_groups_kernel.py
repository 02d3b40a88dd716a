"""The CPU kernels behind integer weight groups: our AVX-512 BF16 kernel (core/kernels) and torch's int4 fallback
multiply by exactly the weight `int_groups_as_float` gives, for 4-bit codes with mins, symmetric 4-bit codes (mins
−8 · scale, llama.cpp's Q4_0) and 8-bit codes without mins."""

import pytest
import torch
from torch import nn

import core.kernels
from core.quantization import low_bit
from core.quantization.low_bit import AVX512_KERNEL, TORCH_INT4_KERNEL, IntGroups, int_groups_as_float

needs_avx512_bf16 = pytest.mark.skipif(core.kernels.cpu_kernels() is not None,
                                       reason=f"AVX-512 BF16 kernel: {core.kernels.cpu_kernels()}")


def random_groups(rows: int, columns: int, group: int, bits: int | str, seed: int = 0):
    """bits 4, "4 symmetric" or 8."""
    generator = torch.Generator().manual_seed(seed)
    if bits == 8:
        codes = torch.randint(-128, 128, (rows, columns), generator=generator, dtype=torch.int8)
        mins = None
    else:
        codes = torch.randint(0, 16, (rows, columns), generator=generator, dtype=torch.uint8)
        mins = -torch.rand(rows, columns // group, generator=generator) * 0.1
    scales = torch.rand(rows, columns // group, generator=generator) * 0.02 + 1e-3
    if bits == "4 symmetric":
        scales = scales.half().float()
        mins = -8 * scales
    return codes, scales, mins


@pytest.mark.parametrize("kernel", [AVX512_KERNEL, TORCH_INT4_KERNEL])
@pytest.mark.parametrize("bits", [4, "4 symmetric", 8])
@pytest.mark.parametrize("rows,columns,group,batch", [(16, 32, 32, 1), (96, 192, 32, 3), (48, 256, 64, 8),
                                                       (32, 128, 128, 11), (80, 64, 32, 5)])
def test_int_groups_multiply_by_their_float_weight(monkeypatch, kernel, bits, rows, columns, group, batch):
    if kernel == AVX512_KERNEL and core.kernels.cpu_kernels() is not None:
        pytest.skip(f"AVX-512 BF16 kernel: {core.kernels.cpu_kernels()}")
    monkeypatch.setattr(low_bit, "int_groups_kernel_for", lambda group: kernel)
    codes, scales, mins = random_groups(rows, columns, group, bits)
    weight = IntGroups(nn.Parameter(torch.empty(rows, columns)), group)
    weight.set_groups(codes, scales, mins)
    x = torch.randn(batch, columns).bfloat16().float()
    expected = x.double() @ int_groups_as_float(codes, scales, mins, group).double().T
    got = weight(x)
    assert got.shape == (batch, rows) and got.dtype == torch.float32
    # float32 accumulation of exact products: relative error ~1e-6 of the sum of magnitudes; torch's kernel rounds
    # its output to bfloat16 (each of an 8-bit code's two terms)
    magnitude = x.abs().double() @ int_groups_as_float(codes, scales, mins, group).abs().double().T
    bound = magnitude * (1e-5 if kernel == AVX512_KERNEL else 2.0**-7) + 1e-6
    assert ((got.double() - expected).abs() <= bound).all(), (got.double() - expected).abs().max()


@needs_avx512_bf16
def test_avx512_kernel_keeps_the_files_float16_scales_where_torch_rounds_to_bfloat16(monkeypatch):
    codes, scales, mins = random_groups(16, 64, 32, 4, seed=1)
    as_float = {}
    for kernel in (AVX512_KERNEL, TORCH_INT4_KERNEL):
        monkeypatch.setattr(low_bit, "int_groups_kernel_for", lambda group, kernel=kernel: kernel)
        as_float[kernel] = int_groups_as_float(codes, scales, mins, 32)
    exact = (codes.float().unflatten(-1, (-1, 32)) * scales.half().float()[..., None]
             + mins.half().float()[..., None]).flatten(-2)
    assert torch.equal(as_float[AVX512_KERNEL], exact)
    assert not torch.equal(as_float[TORCH_INT4_KERNEL], exact)


@needs_avx512_bf16
def test_symmetric_groups_read_no_mins_and_give_what_the_same_groups_with_mins_give():
    codes, scales, mins = random_groups(64, 256, 32, "4 symmetric", seed=2)
    symmetric = IntGroups(nn.Parameter(torch.empty(64, 256)), 32)
    symmetric.set_groups(codes, scales, mins)
    with_mins = IntGroups(nn.Parameter(torch.empty(64, 256)), 32)
    with_mins.set_groups(codes, scales, mins + 2.0**-10)  # no longer −8 · scale: mins kept
    assert symmetric.symmetric and not with_mins.symmetric
    assert symmetric.packed_bytes() * 10 == with_mins.packed_bytes() * 9  # per block 288 bytes, not 320
    x = torch.randn(8, 256).bfloat16().float()  # values the bfloat16 kernel takes as they are
    shift = x.unflatten(-1, (-1, 32)).sum(-1) @ torch.full((64, 8), 2.0**-10).T
    torch.testing.assert_close(symmetric(x) + shift, with_mins(x), rtol=1e-5, atol=1e-5)


@needs_avx512_bf16
def test_kernel_rejects_activations_that_are_not_bfloat16():
    codes, scales, mins = random_groups(16, 32, 32, 4)
    weight = IntGroups(nn.Parameter(torch.empty(16, 32)), 32)
    weight.set_groups(codes, scales, mins)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.recipes_scaffold.int4_groups_mm(torch.randn(1, 32), weight.blocks)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.recipes_scaffold.int4_groups_mm(torch.randn(1, 64).bfloat16(), weight.blocks)


def test_a_failed_kernel_build_names_its_log_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match=r"the kernel build failed, see .*\.log"):
        core.kernels.built_library()
    built = list((tmp_path / "recipes-scaffold" / "kernels").iterdir())
    assert [path.suffix for path in built] == [".log"]
