"""Inductor's C++ GEMM template, made to stop re-parsing the same sources for every matrix product it generates.

A frozen, max-autotuned float graph (SmolLM2: 121 matrix products) renders the GEMM template about twice per
product, and each render compiles its Jinja sources again from their text (`KernelTemplate._template_from_string`
builds a new Jinja environment and calls `from_string`, 2443 times for SmolLM2) and parses the same index
expressions again with sympy (`parse_expr_with_index_symbols`, 9248 times). Both are pure functions of their text:
a compiled Jinja template renders anew on each call, and a sympy expression is immutable. Remembering them by their
text leaves every generated kernel, and so inductor's cache keys, as they were. Frozen graphs bypass inductor's
FX-graph cache (their prepacked weights cannot be pickled), so every process lowers them again and pays this.

SmolLM2 bf16 batch 1, a process whose autotuning results are cached, 2-core AMD EPYC, paired runs: compile 52-54 ->
36-39 s.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def remember_template_parses() -> bool:
    """Make inductor remember its parsed template sources and index expressions (once per process); False where
    this torch release does not have the functions this knows."""
    import torch._inductor.compile_fx  # noqa: F401  (the template modules import inductor's lowering first)
    from torch._inductor.codegen import cpp_template_kernel
    from torch._inductor.codegen.common import KernelTemplate

    parse_template = KernelTemplate.__dict__.get("_template_from_string")
    parse_index = getattr(cpp_template_kernel, "parse_expr_with_index_symbols", None)
    if not isinstance(parse_template, staticmethod) or not callable(parse_index):
        logger.info("inductor's template parsing is not the one this knows; it stays as it is")
        return False
    KernelTemplate._template_from_string = staticmethod(functools.cache(parse_template.__func__))
    parsed_text = functools.cache(parse_index)

    def parse_index_remembered(expr):
        # lists and tuples recurse through this module attribute, so their items are remembered one by one
        return parsed_text(expr) if isinstance(expr, str) else parse_index(expr)

    cpp_template_kernel.parse_expr_with_index_symbols = parse_index_remembered
    return True
