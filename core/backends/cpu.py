from __future__ import annotations

from typing import Callable

import torch
from torch._inductor import list_mode_options

from core.backends.base import DeviceBackend, one_graph


# Inductor inlines a pointwise body of up to 50 ops on CPU into each consumer. The rotary-embedded query (~20 ops
# with its cos and sin) is consumed by the attention's dot product with every cached key, so it was recomputed per
# key: SmolLM2's attention took 5.3 ms of a batch-8 decode step on a 2-core EPYC, 1.35 ms when bodies above 16
# ops are computed once.
DECODE_FUSION = {"realize_opcount_threshold": 16}


class CpuBackend(DeviceBackend):
    name = "cpu"
    exe_modes = ("eager", "inductor")
    dist_backend = "gloo"
    # Prefill is a few large matrix products, as fast eager as compiled; its graphs (one per prompt bucket) cost as
    # much compile time as the decode step's. SmolLM2 with its GGUF Q4_1 weights kept, on a 2-core EPYC: ready in
    # 47 s instead of ~75 s from a cold cache, and the first prompt's prefill takes 40 ms instead of 30.
    compiles_prefill = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def decode_attention(self, model_attention: str) -> str:
        # One query against the cache: HF's eager attention (matmul, softmax, matmul) is fused by inductor into the
        # layer's own C++ loops, where SDPA stays an opaque call costing ~40 us per layer at SmolLM2's sizes.
        return "eager"

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        # Decode on CPU is a chain of matrix-vector products bound by memory bandwidth. Tuned (float weights by
        # default): freezing folds the inference-only weights into the graph as constants, and max-autotune then
        # times, per weight shape, inductor's C++ GEMM template (weights prepacked into its blocked layout)
        # against MKL: on a 2-core EPYC the template streams SmolLM2's weights at ~85% of the read bandwidth, 2x
        # generic BLAS (bench/). Freezing must be set in inductor's config (torch.compile(options={"freezing":
        # True}) does not reach the freezing pass in torch 2.13), and only around this forward's calls —
        # compilation happens inside them — so that other compiled code keeps its own settings. Frozen graphs
        # bypass the FX-graph cache: every process compiles (minutes for 30 layers); the autotuning table is not
        # printed. Untuned (low-bit linears by default: their kernels need no prepacking): inductor's
        # default mode, about a minute for SmolLM2, and its FX-graph cache (TORCHINDUCTOR_CACHE_DIR) serves a
        # second process in seconds.
        if not (float_matmuls if autotune is None else autotune):
            return one_graph(forward, dict(DECODE_FUSION))

        def frozen():
            return torch._inductor.config.patch(freezing=True, autotune_num_choices_displayed=0,
                                                max_autotune_report_choices_stats=False)

        return one_graph(forward, {**list_mode_options("max-autotune-no-cudagraphs"), **DECODE_FUSION}, frozen)
