from __future__ import annotations

import functools
from typing import Callable

import torch

from core.backends.base import DeviceBackend


class CpuBackend(DeviceBackend):
    name = "cpu"
    exe_modes = ("eager", "inductor")
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        if not (float_matmuls if autotune is None else autotune):
            # Low-bit linears call torch's int4/int8 kernels, which need no prepacking: inductor's default mode
            # compiles SmolLM2 in about a minute, and without freezing its FX-graph cache (under
            # TORCHINDUCTOR_CACHE_DIR) serves a second process in seconds. Float weights take this path when
            # compile_autotune is false: compiled in seconds, decoding at generic-BLAS speed.
            return torch.compile(forward, backend="inductor", dynamic=False)
        # Decode on CPU is a chain of matrix-vector products bound by memory bandwidth. Freezing folds the
        # inference-only weights into the graph as constants, and max-autotune then times, per weight shape,
        # inductor's C++ GEMM template (weights prepacked into its blocked layout) against MKL: on a 2-core EPYC
        # the template streams SmolLM2's weights at ~85% of the read bandwidth, 2x generic BLAS (bench/).
        # Freezing must be set in inductor's config (torch.compile(options={"freezing": True}) does not reach the
        # freezing pass in torch 2.13), and only around this forward's calls — compilation happens inside them —
        # so that other compiled code in the process keeps its own settings. Frozen graphs bypass the FX-graph
        # cache: every process compiles (minutes for 30 layers). The autotuning table is not printed.
        compiled = torch.compile(forward, backend="inductor", dynamic=False, mode="max-autotune-no-cudagraphs")

        @functools.wraps(forward)
        def run_frozen(*args, **kwargs):
            with torch._inductor.config.patch(freezing=True, autotune_num_choices_displayed=0,
                                              max_autotune_report_choices_stats=False):
                return compiled(*args, **kwargs)

        return run_frozen
