"""A model's stack of repeated blocks (its decoder layers), compiled once per distinct block.

Dynamo and inductor otherwise lower and generate code for every layer of the stack one by one — 30 times the same
work for SmolLM2 — and only deduplicate the identical kernels afterwards. Marked as a nested compile region
(`torch.compiler.nested_compile_region`), each layer is still traced, but layers whose graphs are equal share one
compiled subgraph, called once per layer with that layer's weights and cache; a layer that differs (a sliding-window
layer among full ones) gets a subgraph of its own. SmolLM2 with its GGUF Q4_1 weights kept, on a 2-core AMD EPYC
(bench/compile_cost.py, process start to 32 tokens, empty inductor cache): 28-31 s instead of 69 s.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import compiler, nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's outermost module lists that hold two or more modules of one class."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        inside.update(id(nested) for nested in module.modules())
        classes = [type(member) for member in module]
        blocks.extend(member for member in module if classes.count(type(member)) > 1)
    return blocks


class _TracedEachCall:
    """An argument dynamo cannot fingerprint, so that it traces every call of the region instead of reusing the
    first call's trace: torch 2.13 reuses it for blocks that differ only in a plain attribute (four blocks scaling by
    1, 2, 3 and 4 all scaled by 1). Traced graphs that compare equal node for node, constants included, still
    share one compiled subgraph."""


_TRACED_EACH_CALL = _TracedEachCall()


def _block_forward(block: nn.Module, _traced_each_call: _TracedEachCall, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


_REGION = compiler.nested_compile_region(_block_forward)


def compile_blocks_once(model: nn.Module) -> None:
    """Route each repeated block's forward through the compile region."""
    for block in repeated_blocks(model):
        block.forward = functools.partial(_REGION, block, _TRACED_EACH_CALL)


@contextlib.contextmanager
def blocks_inlined(model: nn.Module) -> Iterator[None]:
    """The repeated blocks' own forwards while inside: `torch.export` traces them as plain code, where each region
    would cost it a dynamo trace of its own (SmolLM2's 30 layers: ~19 s against ~4 s)."""
    regions = {block: block.__dict__.pop("forward") for block in repeated_blocks(model) if "forward" in block.__dict__}
    try:
        yield
    finally:
        for block, forward in regions.items():
            block.forward = forward
