"""One torchrun launch that verifies case after case, for a process that asks for many distributed verifications.

A launch costs ~6 s on a 2-core machine before the first case (torchrun and every rank importing torch and
transformers) and ~0.5 s a case after that; a test session proving twenty ports at TP=2 spent two minutes starting
ranks. Inside `shared_launches()`, `verify_port_distributed_cases` hands its cases to a pool instead: the ranks stay
up, read each request from a numbered file, verify its cases with the same `verify_port` and rank 0 writes the
reports back. A rank that fails ends the launch (torchrun stops the others), the request raises with the log's tail,
and the next request starts a fresh launch. Ranks leave on their own when the process that started them is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

POLL_S = 0.05
_ACTIVE: dict[int, RankPool] | None = None


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    staging = path.with_suffix(".partial")
    staging.write_text(json.dumps(data))
    staging.rename(path)


class RankPool:
    """`world_size` ranks under one torchrun launch, started on the first request."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._folder = Path(tempfile.mkdtemp(prefix="rank_pool_"))
        self._process: subprocess.Popen | None = None
        self._log = self._folder / "launch.log"
        self._requests = itertools.count()

    def _start(self) -> None:
        for stale in self._folder.iterdir():
            stale.unlink()
        self._requests = itertools.count()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.world_size}",
            "-m", "scaffold.verify", "--serve", str(self._folder), "--client-pid", str(os.getpid()),
        ]
        with open(self._log, "w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"})

    def run(self, runner_path: str, launched_cases: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The reports (as JSON) of `launched_cases`, each in `scaffold.verify`'s launched form."""
        if self._process is None or self._process.poll() is not None:
            self._start()
        number = next(self._requests)
        reply = self._folder / f"reply-{number}.json"
        _write_atomically(self._folder / f"request-{number}.json", {"runner": runner_path, "cases": launched_cases})
        deadline = time.monotonic() + timeout_s
        while not reply.exists():
            if self._process.poll() is not None:
                log = self._log.read_text()
                errors = [path.read_text() for path in sorted(self._folder.glob(f"failed-{number}-rank*.txt"))]
                raise RuntimeError(f"torchrun verification failed (exit {self._process.returncode}): "
                                   f"{errors[0] if errors else rank_failure(log)}\n{log[-4000:]}")
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"torchrun verification gave no report within {timeout_s:.0f} s:\n"
                                   f"{self._log.read_text()[-4000:]}")
            time.sleep(POLL_S)
        return json.loads(reply.read_text())

    def _stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait()

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            _write_atomically(self._folder / f"request-{next(self._requests)}.json", {"stop": True})
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._stop()
        for leftover in self._folder.iterdir():
            leftover.unlink()
        self._folder.rmdir()


def rank_failure(log: str) -> str:
    """The last exception line the ranks printed (torchrun's own summary after it would hide it)."""
    raised = [found.group(1) for found in re.finditer(r"\b([A-Za-z_][\w.]*(?:Error|Exception): .*)", log)
              if not found.group(1).startswith(("ChildFailedError", "torch.distributed.elastic"))]
    return raised[-1] if raised else "see the log below"


def active_pool(world_size: int) -> RankPool | None:
    """The pool verifications at `world_size` go to, inside `shared_launches()`; None outside it."""
    if _ACTIVE is None:
        return None
    if world_size not in _ACTIVE:
        _ACTIVE[world_size] = RankPool(world_size)
    return _ACTIVE[world_size]


@contextlib.contextmanager
def shared_launches() -> Iterator[None]:
    """Within: distributed verifications share one torchrun launch per world size (started on first use)."""
    global _ACTIVE
    if _ACTIVE is not None:
        yield
        return
    _ACTIVE = {}
    try:
        yield
    finally:
        pools, _ACTIVE = _ACTIVE, None
        for pool in pools.values():
            pool.close()


def _client_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(folder: Path, client_pid: int, verify_cases: Callable[[str, dict[str, Any]], dict[str, Any]]) -> int:
    """A rank's loop: every rank verifies each request's cases (their collectives pair up), rank 0 replies with
    `verify_cases(runner_path, cases)` (reports by name, as JSON)."""
    rank = int(os.environ.get("RANK", "0"))
    for number in itertools.count():
        request = folder / f"request-{number}.json"
        while not request.exists():
            if not _client_alive(client_pid):
                return 0
            time.sleep(POLL_S)
        task = json.loads(request.read_text())
        if task.get("stop"):
            return 0
        try:
            reports = verify_cases(task["runner"], task["cases"])
        except Exception as error:
            # Both ranks write to one log, their tracebacks interleaved: the error itself goes where the client
            # finds it whole.
            (folder / f"failed-{number}-rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
            raise
        if rank == 0:
            _write_atomically(folder / f"reply-{number}.json", reports)
    return 0
