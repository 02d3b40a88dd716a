"""Matrix products of one activation row take inductor's C++ GEMM template on CPU without being timed against the
other choices.

Max-autotune times every candidate kernel of a product before choosing, and on CPU each C++ template candidate is a
library compiled for the timing alone (~2-3 s of g++ each; SmolLM2 has 6 distinct product shapes). A decode step of
one sequence multiplies a single row by each weight: a stream of the weight bound by memory. There the template
(inductor's blocked weight layout, read once) won all 121 products in each of the 15 tuned SmolLM2 batch-1 graphs,
bf16 and fp32, that a 2-core AMD EPYC's inductor cache held; the one cold compile that timed oneDNN faster for a
shape (gate|up, while the shared host's speed moved) gave a slower step: 11.0-11.4 ms against 9.1-9.7 ms with the
template, bf16. With more rows the products approach compute: at batch 8 oneDNN's kernels won all 121 bf16
products (the template the fp32 ones), so those are still timed.

The filter runs inside inductor's choice selection (`select_algorithm.add_preprocessing_fn`, applied to every
product's candidates): it keeps only the C++ template candidates where the product's output has one row and a
template is offered, and changes nothing else. With one candidate left inductor takes it without timing.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def one_row_takes_the_template(choices: list) -> list:
    from torch._inductor.codegen.cpp_template_kernel import CppTemplateCaller

    # the template's candidates come wrapped with its weight packing (select_algorithm.DataProcessorChoiceCallerWrapper)
    templates = [choice for choice in choices if isinstance(getattr(choice, "_wrapped", choice), CppTemplateCaller)]
    if not templates or len(templates) == len(choices):
        return choices
    size = templates[0].layout.size
    return templates if len(size) == 2 and size[0] == 1 else choices


@functools.cache
def one_row_products_untimed() -> bool:
    """Register the filter with inductor (once per process); False where this torch release has no such hook."""
    from torch._inductor import select_algorithm

    register = getattr(select_algorithm, "add_preprocessing_fn", None)
    if register is None:
        logger.info("inductor takes no choice filter here: products of one row are timed as the others")
        return False
    register(one_row_takes_the_template)
    return True
