from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch._inductor import list_mode_options

from core.backends.aot_step import AotGreedyStep
from core.backends.base import DeviceBackend, one_graph
from core.backends.float_rows import float_linears_on_kernel
from core.backends.gemm_choices import one_row_products_untimed
from core.backends.huge_pages import HugePageMove, graph_constants_on_huge_pages
from core.backends.repeated_blocks import compile_blocks_once
from core.backends.template_codegen import remember_template_parses
from core.backends.vector_isa import trusted_isa_options
from core.decode_attention import CPU_DECODE
from core.kernels import c_shim_options, cpu_kernels

logger = logging.getLogger(__name__)

# Inductor inlines a pointwise body of up to 50 ops on CPU into each consumer. The rotary-embedded query (~20 ops
# with its cos and sin) is consumed by the attention's dot product with every cached key, so it was recomputed per
# key: SmolLM2's attention took 5.3 ms of a batch-8 decode step on a 2-core EPYC, 1.35 ms when bodies above 16
# ops are computed once.
DECODE_FUSION = {"realize_opcount_threshold": 16}
# Inductor checks the sizes and strides of a graph's inputs in Python before every call, and of each decoder layer's
# subgraph inputs once per layer (core.backends.repeated_blocks): ~15 checks a layer, 10% / 6% of a SmolLM2 Q4_1
# step at batch 1 / 8 on 2 EPYC cores. Dynamo's guards already check the graph's inputs; what flows between
# subgraphs inductor produced.
NO_INPUT_CHECKS = {"size_asserts": False, "alignment_asserts": False}


def tuned(float_matmuls: bool, autotune: bool | None) -> bool:
    """Whether a graph is compiled frozen and max-autotuned: by default float weights where our AVX-512 kernels
    are not available (see _compile_graph)."""
    if autotune is not None:
        return autotune
    return float_matmuls and cpu_kernels() is not None


class CpuBackend(DeviceBackend):
    name = "cpu"
    exe_modes = ("eager", "inductor")
    dist_backend = "gloo"
    # Prefill is a few large matrix products, as fast eager as compiled; its graphs (one per prompt bucket) cost as
    # much compile time as the decode step's. SmolLM2 with its GGUF Q4_1 weights kept, on a 2-core EPYC: ready in
    # 47 s instead of ~75 s from a cold cache, and the first prompt's prefill takes 40 ms instead of 30.
    compiles_prefill = False
    greedy_step_in_graph = True

    @classmethod
    def is_available(cls) -> bool:
        return True

    # The weights' move onto huge pages while its memory is made ready, finished after the first compiled call.
    moving: HugePageMove | None = None
    # prepare_for_graphs saw graphs that take the weights as inputs: the move may wait for their first call.
    weights_are_graph_inputs = False

    def place_weights(self, model: torch.nn.Module) -> None:
        """Onto huge pages (core.backends.huge_pages). Graphs that take the weights as inputs are traced and compiled
        (or loaded from inductor's cache) on the interpreter's thread while the huge pages' memory is made ready on
        another; the weights move after the first compiled call (SmolLM2 float32 from a warm inductor cache, process
        start to 32 tokens on a 2-core AMD EPYC VM, three runs each: 13.2 s against 14.4). Eager and frozen graphs
        read the weights where they are from the start: they move now."""
        move = HugePageMove.plan(model)
        if move is None:
            return
        if self.weights_are_graph_inputs and move.prepare_in_background():
            self.moving = move
        else:
            self._log_placed(move.finish())

    def _finish_placing(self) -> None:
        if self.moving is not None:
            move, self.moving = self.moving, None
            self._log_placed(move.finish())

    @staticmethod
    def _log_placed(moved: int) -> None:
        logger.info("weights on huge pages: %.0f MB", moved / 1e6)

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def decode_attention(self, model_attention: str) -> str:
        # One query against the cache: our AVX-512 kernel (core.decode_attention.cpu_decode_attention), else HF's
        # eager attention (matmul, softmax, matmul), which inductor fuses into the layer's own C++ loops — SDPA
        # stays an opaque call costing ~40 us per layer at SmolLM2's sizes.
        return CPU_DECODE if cpu_kernels() is None else "eager"

    def prepare_for_graphs(self, model: torch.nn.Module, exe_mode: str, dtype: torch.dtype,
                           float_matmuls: bool = True, autotune: bool | None = None) -> None:
        """Untuned graphs multiply by float weights on our AVX-512 kernel where the CPU has it (laid out for it once
        here, core.backends.float_rows) and compile each distinct decoder layer once, not once per layer
        (core.backends.repeated_blocks). Tuned ones compile every layer: a layer's subgraph takes its weights as
        inputs, which freezing cannot fold and prepack (SmolLM2 bf16: 23 ms a step instead of 8.5)."""
        if tuned(float_matmuls, autotune):
            return
        self.weights_are_graph_inputs = True
        if cpu_kernels() is None:
            kept = float_linears_on_kernel(model)
            if kept:
                name, why = next(iter(kept.items()))
                logger.info("%d float linear layers keep torch's product (e.g. %s: %s)", len(kept), name, why)
        compile_blocks_once(model)

    def compile_greedy_step(self, forward: Callable, model: torch.nn.Module, exe_mode: str,
                            float_matmuls: bool = True, autotune: bool | None = None,
                            ahead_of_time: bool | None = None) -> Callable:
        """Untuned `inductor` steps, unless ahead_of_time is False: an AOTInductor library
        (core.backends.aot_step), the torch.compile step where it cannot be one. The weights move onto huge pages
        before the library takes them. SmolLM2 with its Q4_1 codes kept, process start to 32 tokens on 2 AMD EPYC
        cores: 8.5 s from the kept library against ~13-14 s from torch.compile's cached graph, 35 s cold."""
        compiled = self.compile(forward, exe_mode, float_matmuls, autotune)
        if exe_mode == "eager" or tuned(float_matmuls, autotune) or ahead_of_time is False:
            return compiled
        return AotGreedyStep(forward, model, compiled, {**self._untuned_options(), **c_shim_options()},
                             before_loading=self._finish_placing)

    @staticmethod
    def _untuned_options() -> dict:
        return {**DECODE_FUSION, **NO_INPUT_CHECKS, **trusted_isa_options()}

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        # Decode on CPU is a chain of matrix-vector products bound by memory bandwidth. Untuned (the default where
        # the CPU has our AVX-512 kernels): float weights are multiplied by our kernel (core.backends.float_rows),
        # low-bit ones by theirs, and inductor compiles the rest in its default mode; the weights stay graph
        # inputs, so inductor's FX-graph cache (TORCHINDUCTOR_CACHE_DIR) serves the next process, and each distinct
        # decoder layer is compiled once (prepare_for_graphs). SmolLM2 bf16 on a 2-core AMD EPYC, paired in one
        # process against the tuned graph: ready in 11-15 s instead of 37-42 s, a batch-1 step 10.99 ms against
        # 9.84, a batch-8 step 13.2 against 19.5; fp32 batch 1 22.1 against 21.4.
        # Tuned (compile_autotune: true, or float weights without our kernels): freezing folds the inference-only
        # weights into the graph as constants, and max-autotune then times, per weight shape, inductor's C++ GEMM
        # template (weights prepacked into its blocked layout) against MKL, which streams the weights at ~2x
        # generic BLAS. Freezing must be set in inductor's config (torch.compile(options={"freezing": True}) does
        # not reach the freezing pass in torch 2.13), and only around this forward's calls — compilation happens
        # inside them — so that other compiled code keeps its own settings. Frozen graphs bypass the FX-graph cache
        # (freezing prepacks the weights as mkldnn tensors, which the cache cannot pickle): every process lowers
        # the graph again, the kernels' timings come from the autotuning cache, and the GEMM template's sources are
        # parsed once per process instead of once per product (template_codegen). Products of one row take the
        # template without timing it (gemm_choices): it wins them, and timing compiles a library per candidate
        # (SmolLM2 bf16 from an empty cache: 71 -> 55 s). The autotuning table is not printed. The packed copies of
        # the weights a frozen graph holds go onto huge pages where they lie (core.backends.huge_pages), as the
        # model's own weights did.
        if not tuned(float_matmuls, autotune):
            compiled = one_graph(forward, self._untuned_options())

            @functools.wraps(compiled)
            def run(*args, **kwargs):
                result = compiled(*args, **kwargs)
                self._finish_placing()
                return result

            return run

        remember_template_parses()
        one_row_products_untimed()

        def frozen():
            return torch._inductor.config.patch(freezing=True, autotune_num_choices_displayed=0,
                                                max_autotune_report_choices_stats=False)

        options = {**list_mode_options("max-autotune-no-cudagraphs"), **DECODE_FUSION, **NO_INPUT_CHECKS,
                   **trusted_isa_options()}
        return graph_constants_on_huge_pages(one_graph(forward, options, frozen))
