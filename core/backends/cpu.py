from __future__ import annotations

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

    def _compile_graph(self, forward: Callable, exe_mode: str) -> Callable:
        return torch.compile(forward, backend="inductor", dynamic=False)
