"""Weights moved onto transparent huge pages (core.backends.huge_pages): the model computes the same, tied weights
stay one tensor, each weight keeps a storage of its own, and the memory is advised for huge pages; weights a graph
takes as inputs move after its first call, onto memory made ready meanwhile; memory that cannot move (a frozen
graph's packed weights) is backed by huge pages where it lies."""

import gc
from pathlib import Path

import pytest
import torch
from torch import nn

from core.backends import huge_pages
from core.backends.cpu import CpuBackend
from core.backends.huge_pages import (HUGE_PAGE, HugePageMove, collapse_into_huge_pages, huge_pages_on_request,
                                       kernel_collapses, place_on_huge_pages)


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4096, 256)
        self.blocks = nn.ModuleList(nn.Linear(256, 256) for _ in range(4))
        self.head = nn.Linear(256, 4096, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((256,), 0.5))

    def forward(self, tokens):
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = torch.relu(block(hidden)) * self.scale
        return self.head(hidden)


def _tied_model_and_logits() -> tuple[TiedModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TiedModel().eval()
    tokens = torch.randint(0, 4096, (2, 5))
    with torch.inference_mode():
        return model, tokens, model(tokens)


def _advised_for_huge_pages(address: int) -> bool:
    """Whether the mapping holding `address` carries the huge-page advice (VmFlags "hg")."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()
    return False


@pytest.mark.skipif(not huge_pages_on_request(), reason="this kernel's huge pages are not in madvise mode")
def test_moved_weights_compute_the_same_and_stay_tied():
    model, tokens, before = _tied_model_and_logits()
    embedding_parameter = model.embed.weight

    moved = place_on_huge_pages(model)

    assert moved >= HUGE_PAGE
    assert model.head.weight is model.embed.weight is embedding_parameter
    storages = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    assert len(storages) == len(list(model.parameters())) + len(list(model.buffers()))
    assert all(_advised_for_huge_pages(tensor.data_ptr()) for tensor in model.parameters())
    with torch.inference_mode():
        assert torch.equal(model(tokens), before)


@pytest.mark.skipif(not huge_pages_on_request(), reason="this kernel's huge pages are not in madvise mode")
def test_graph_inputs_move_after_the_first_compiled_call():
    model, tokens, expected = _tied_model_and_logits()
    backend = CpuBackend()
    address = model.embed.weight.data_ptr()

    backend.prepare_for_graphs(model, "inductor", torch.float32, float_matmuls=False, autotune=False)
    compiled = backend.compile(model.forward, "inductor", float_matmuls=False, autotune=False)
    backend.place_weights(model)

    assert backend.moving is not None and model.embed.weight.data_ptr() == address
    with torch.inference_mode():
        torch.testing.assert_close(compiled(tokens), expected)
        assert backend.moving is None and model.head.weight is model.embed.weight
        assert all(_advised_for_huge_pages(tensor.data_ptr()) for tensor in model.parameters())
        torch.testing.assert_close(compiled(tokens), expected)


@pytest.mark.skipif(not huge_pages_on_request(), reason="this kernel's huge pages are not in madvise mode")
def test_weights_that_would_not_fit_in_memory_twice_move_at_once(monkeypatch):
    monkeypatch.setattr(huge_pages, "_available_memory", lambda: 0)
    model = TiedModel().eval()
    backend = CpuBackend()
    backend.prepare_for_graphs(model, "inductor", torch.float32, float_matmuls=False, autotune=False)

    backend.place_weights(model)

    assert backend.moving is None
    assert all(_advised_for_huge_pages(tensor.data_ptr()) for tensor in model.parameters())


@pytest.mark.skipif(not huge_pages_on_request(), reason="this kernel's huge pages are not in madvise mode")
def test_a_weight_replaced_after_the_plan_stays_where_it_is():
    model = TiedModel().eval()
    move = HugePageMove.plan(model)
    model.blocks[0].weight = nn.Parameter(torch.randn(512, 256))
    replaced = model.blocks[0].weight.detach().clone()

    move.finish()

    assert not _advised_for_huge_pages(model.blocks[0].weight.data_ptr())
    assert torch.equal(model.blocks[0].weight, replaced)
    assert _advised_for_huge_pages(model.blocks[1].weight.data_ptr())


def test_a_model_under_one_huge_page_stays_where_it_is():
    model = nn.Linear(64, 64)
    address = model.weight.data_ptr()
    assert place_on_huge_pages(model) == 0 and model.weight.data_ptr() == address


def _anon_huge_page_bytes() -> int:
    gc.collect()  # huge pages an earlier test's unreachable model still holds must not go between two counts
    text = Path("/proc/self/smaps_rollup").read_text()
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("AnonHugePages:"))


@pytest.mark.skipif(not kernel_collapses(), reason="needs madvise-mode huge pages and MADV_COLLAPSE (Linux 6.1+)")
def test_memory_others_hold_is_backed_by_huge_pages_where_it_lies():
    held = torch.arange(4 * HUGE_PAGE // 4, dtype=torch.int32)
    address, before = held.data_ptr(), _anon_huge_page_bytes()

    assert collapse_into_huge_pages([held]) >= 3 * HUGE_PAGE  # at least the ranges wholly inside it

    assert held.data_ptr() == address
    assert torch.equal(held, torch.arange(4 * HUGE_PAGE // 4, dtype=torch.int32))
    assert _anon_huge_page_bytes() - before >= 3 * HUGE_PAGE


@pytest.mark.skipif(not kernel_collapses(), reason="needs madvise-mode huge pages and MADV_COLLAPSE (Linux 6.1+)")
def test_a_frozen_graphs_own_copies_of_the_weights_go_onto_huge_pages():
    torch.manual_seed(0)
    model, x = nn.Linear(1024, 2048).eval(), torch.randn(1, 1024)
    with torch.inference_mode():
        expected = model(x)
        compiled = CpuBackend().compile(model.forward, "inductor", autotune=True)
        before = _anon_huge_page_bytes()
        assert torch.allclose(compiled(x), expected, atol=1e-4)
        assert _anon_huge_page_bytes() - before >= 3 * HUGE_PAGE  # the 8 MB weight's packed copy
        assert torch.allclose(compiled(x), expected, atol=1e-4)
