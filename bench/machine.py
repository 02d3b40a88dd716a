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


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Best of `repeats` full reads (a sum) of a buffer far larger than the caches, in GB/s."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    synchronize = BACKENDS[device]().synchronize
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        buffer.sum()
        synchronize()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9
