"""Greedy decoding's argmax on CPU (core/kernels/row_argmax_avx512.cpp, reached through core.sampling.greedy_tokens)
chooses the token torch.argmax chooses: the first of tied maxima, the first NaN, index 0 of an all -inf row, at
vocabulary sizes that are and are not multiples of the kernel's sixteen lanes."""

import pytest
import torch

import core.kernels
from core.sampling import greedy_tokens

pytestmark = pytest.mark.skipif(core.kernels.cpu_kernels() is not None,
                                reason=f"AVX-512 kernels: {core.kernels.cpu_kernels()}")


@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 49152, 49155])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_random_rows_choose_what_torch_chooses(batch, vocab):
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(vocab + batch))
    assert torch.equal(torch.ops.recipes_scaffold.row_argmax(logits), logits.argmax(dim=-1))


def test_ties_nans_and_infinities_resolve_as_torch_resolves_them():
    vocab = 100
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, [70, 3, 35]] = 9.0  # ties in different lanes: the first index
    logits[1, [19, 3]] = 9.0  # ties in the same lane
    logits[2, [80, 40]] = float("nan")  # a NaN beats every number, the first one wins
    logits[2, 90] = float("inf")
    logits[3] = float("-inf")  # nothing above -inf: index 0
    logits[4, 97] = float("inf")  # in the tail past the last full sixteen
    logits[5, [0, 50]] = torch.finfo(torch.float32).max
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    assert greedy_tokens(logits).tolist() == [3, 3, 40, 0, 97, 0]


def test_greedy_tokens_take_bfloat16_and_views():
    logits = torch.randn(4, 2 * 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)[:, ::2]
    assert torch.equal(greedy_tokens(logits), logits.float().argmax(dim=-1))


def test_malformed_logits_are_refused_with_what_was_given():
    with pytest.raises(RuntimeError, match="contiguous float32 logits"):
        torch.ops.recipes_scaffold.row_argmax(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="vocabulary of 1"):
        torch.ops.recipes_scaffold.row_argmax(torch.zeros(2, 0))
