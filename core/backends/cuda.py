from __future__ import annotations

from typing import Callable

import torch

from core.backends.base import DeviceBackend


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

    def _compile_graph(self, forward: Callable, exe_mode: str, float_matmuls: bool,
                       autotune: bool | None) -> Callable:
        if autotune:
            mode = "max-autotune" if exe_mode == "cuda_graph" else "max-autotune-no-cudagraphs"
        else:
            mode = "reduce-overhead" if exe_mode == "cuda_graph" else None
        return torch.compile(forward, backend="inductor", mode=mode, dynamic=False)

    def _profiler_activities(self) -> list:
        return [torch.profiler.ProfilerActivity.CUDA]
