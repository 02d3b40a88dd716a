"""What the benchmarks say about the machine they ran on: the CPU's model and the memory's read bandwidth."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from core.backends import BACKENDS


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class BandwidthProbe:
    """Reads one buffer far larger than the caches (a sum), again at every call: a probe taken between two
    measurements costs only its reads."""

    def __init__(self, gib: float = 1.0, device: str = "cpu"):
        self.buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
        self.synchronize = BACKENDS[device]().synchronize

    def read_gb_s(self, repeats: int = 5) -> float:
        """Best of `repeats` full reads, in GB/s."""
        best = float("inf")
        for _ in range(repeats):
            self.synchronize()
            started = time.perf_counter()
            self.buffer.sum()
            self.synchronize()
            best = min(best, time.perf_counter() - started)
        return self.buffer.numel() * 4 / best / 1e9


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Best of `repeats` full reads of a fresh buffer of `gib` GiB, in GB/s."""
    return BandwidthProbe(gib, device).read_gb_s(repeats)
