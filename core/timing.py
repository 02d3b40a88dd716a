"""Timing of prefill and every decode step: wall-clock around a synchronised device (StepTimer), or events the
device records in its stream (the CUDA backend's), read once the generation is over."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class GenerationTiming:
    batch_size: int
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        decode = sorted(self.decode_ms)
        decode_seconds = sum(decode) / 1000
        return {
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_steps": len(decode),
            "decode_ms_mean": round(statistics.fmean(decode), 3) if decode else 0.0,
            "decode_ms_p50": round(_percentile(decode, 50), 3),
            "decode_ms_p90": round(_percentile(decode, 90), 3),
            "decode_tokens_per_s": round(self.batch_size * len(decode) / decode_seconds, 2) if decode else 0.0,
        }

    def report(self) -> str:
        s = self.summary()
        return (
            f"prefill {s['prefill_ms']:.1f} ms | decode {s['decode_steps']} steps: mean {s['decode_ms_mean']:.2f} ms, "
            f"p50 {s['decode_ms_p50']:.2f} ms, p90 {s['decode_ms_p90']:.2f} ms | "
            f"{s['decode_tokens_per_s']:.1f} tokens/s (batch {self.batch_size})"
        )


class StepTimer:
    """Times one step: `with timer: ...`, then read `elapsed_ms`. Waits for the device on entry and exit, so a
    step's time is its own; where the device queues work (CUDA), a backend's event timer avoids those waits."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.elapsed_ms = 0.0

    def __enter__(self) -> "StepTimer":
        self.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.synchronize()
        self.elapsed_ms = (time.perf_counter() - self._start) * 1000


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)
