from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable

import torch
from torch._inductor import list_mode_options

from core.backends.base import DeviceBackend

logger = logging.getLogger(__name__)


class CpuBackend(DeviceBackend):
    name = "cpu"
    exe_modes = ("eager", "inductor")
    dist_backend = "gloo"
    # One query against the cache: HF's eager attention (matmul, softmax, matmul) is fused by inductor into the
    # layer's own C++ loops, where SDPA stays an opaque call costing ~40 us per layer at SmolLM2's sizes.
    decode_attention = "eager"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

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
        # printed. Untuned (low-bit linears by default: torch's int4/int8 kernels need no prepacking): inductor's
        # default mode, about a minute for SmolLM2, and its FX-graph cache (TORCHINDUCTOR_CACHE_DIR) serves a
        # second process in seconds.
        tuned = float_matmuls if autotune is None else autotune
        compiled = _inductor(forward, tuned, trust_modules=True)

        @functools.wraps(forward)
        def run(*args, **kwargs):
            nonlocal compiled
            frozen = (torch._inductor.config.patch(freezing=True, autotune_num_choices_displayed=0,
                                                   max_autotune_report_choices_stats=False)
                      if tuned else contextlib.nullcontext())
            with frozen:
                try:
                    return compiled(*args, **kwargs)
                except torch._dynamo.exc.Unsupported:
                    # A graph break: the model's own functions get compiled too, and those are shared with every
                    # other model of the class, so their guards on the modules must stay.
                    logger.info("the forward does not compile to one graph: modules stay guarded")
                    compiled = _inductor(forward, tuned, trust_modules=False)
                    return compiled(*args, **kwargs)

        return run


def _inductor(forward: Callable, tuned: bool, trust_modules: bool) -> Callable:
    """trust_modules: one graph (fullgraph) whose guards skip the modules. A port's modules never change after
    init_model (weights are loaded, split, quantized and cast before the first compile), and `forward` has a code
    object of its own (DeviceBackend.compile), so no other model reaches these graphs: dynamo need not re-check
    every parameter and module attribute before each call, which costs ~1.2 ms per SmolLM2 decode step on 2
    cores. Inputs, the cache included, stay guarded."""
    options = dict(list_mode_options("max-autotune-no-cudagraphs")) if tuned else {}
    if trust_modules:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(forward, backend="inductor", dynamic=False, fullgraph=trust_modules, options=options)
