from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch._inductor import list_mode_options

from core.backends.base import DeviceBackend, one_graph
from core.decode_attention import GROUPED_DECODE

logger = logging.getLogger(__name__)


class CudaBackend(DeviceBackend):
    name = "cuda"
    exe_modes = ("eager", "inductor", "cuda_graph")
    dist_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def set_device(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def decode_attention(self, model_attention: str) -> str:
        # On an H200, a 1B llama's decode step spent ~11 us per layer in SDPA (copies of the repeated KV heads, a
        # cuDNN kernel made for long queries) where the grouped reductions take a few. Other implementations
        # (eager with attention sinks, soft-capping) are the model's own and stay.
        return GROUPED_DECODE if model_attention == "sdpa" else model_attention

    def prepare_for_graphs(self, model: torch.nn.Module, exe_mode: str, dtype: torch.dtype,
                           float_matmuls: bool = True, autotune: bool | None = None) -> None:
        """transformers' grouped-matmul experts fall back, for weights other than bf16, to a loop over the experts'
        row offsets read on the host, which a CUDA graph cannot capture; its batched matmul never leaves the
        device."""
        if exe_mode != "cuda_graph" or dtype == torch.bfloat16:
            return
        configs = {id(config): config for module in model.modules()
                   if (config := getattr(module, "config", None)) is not None}
        for config in configs.values():
            if getattr(config, "_experts_implementation", None) == "grouped_mm":
                config._experts_implementation = "batched_mm"
                logger.info("%s experts run batched_mm in CUDA graphs: grouped_mm reads offsets on the host for %s "
                            "weights", config.model_type, dtype)

    def step_timer(self) -> "CudaEventTimer":
        return CudaEventTimer()

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        if autotune:
            mode = "max-autotune" if exe_mode == "cuda_graph" else "max-autotune-no-cudagraphs"
        else:
            mode = "reduce-overhead" if exe_mode == "cuda_graph" else "default"
        # cuda_graph: each call replays into the graphs' memory pool, so the previous call's outputs (the last
        # step's logits, already consumed) may be overwritten; marking the step says so to inductor's CUDA graph
        # trees instead of letting them guess from the call pattern.
        around_call = _new_replay if exe_mode == "cuda_graph" else contextlib.nullcontext
        return one_graph(forward, dict(list_mode_options(mode)), around_call)

    def _profiler_activities(self) -> list:
        return [torch.profiler.ProfilerActivity.CUDA]


@contextlib.contextmanager
def _new_replay():
    torch.compiler.cudagraph_mark_step_begin()
    yield


class CudaEventTimer:
    """Times one step by events recorded in the current stream: the host never waits for the device between
    steps, so it queues the next step while the GPU runs this one. `elapsed_ms` is read once the caller has
    synchronised (after the generation)."""

    def __enter__(self) -> "CudaEventTimer":
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record()
        return self

    def __exit__(self, *exc_info) -> None:
        self._end.record()

    @property
    def elapsed_ms(self) -> float:
        return self._start.elapsed_time(self._end)
