"""Inductor's check of the CPU's vector instruction sets, done once per machine instead of once per process.

Before compiling or loading a C++ kernel, inductor builds a small test library for each instruction set the CPU
lists (AVX2, AVX-512, ...) and loads each in a new Python process to see that the compiler and the loader accept
it. The test libraries stay in inductor's cache, but the loads are repeated in every process: three of them load
libtorch, ~0.27 s each, 0.8 s of a warm SmolLM2 start (2-core AMD EPYC), before any cached graph is read.

The first process on a machine runs the checks as inductor does and records whether every instruction set the CPU
lists passed them, keyed by the CPU's flags, the C++ compiler's version, Python and torch. Later processes that find
"all passed" compile with `cpp.vec_isa_ok` (inductor's own switch: trust the CPU's list, skip the base checks;
AVX-512 BF16 and VNNI are still checked the usual way), so every process compiles with the same settings, which
inductor's cache keys include. A machine where a check failed keeps inductor's checks in every process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from core.kernels import cache_dir as kernels_cache_dir

logger = logging.getLogger(__name__)


def memo_dir() -> Path:
    return kernels_cache_dir().parent / "inductor-vector-isa"


def _listed_and_checked() -> tuple[list[str], list[str]]:
    """The instruction sets inductor would use by the CPU's flags alone, and those that pass its checks."""
    from torch._inductor import config
    from torch._inductor import cpu_vec_isa as isa

    flags = isa.x86_isa_checker()
    listed = [str(each) for each in isa.supported_vec_isa_list if all(flag in flags for flag in str(each).split())]
    with config.patch({"cpp.vec_isa_ok": None}):
        checked = [str(each) for each in isa.valid_vec_isa_list()]
    return listed, checked


def _machine_key() -> str:
    from torch._inductor import cpu_vec_isa as isa
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    identity = [sys.executable, sys.version, torch.__version__, " ".join(isa.x86_isa_checker()),
                get_compiler_version_info(get_cpp_compiler())]
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]


def _recorded(memo: Path) -> bool | None:
    try:
        return bool(json.loads(memo.read_text())["all_passed"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _check_and_record(memo: Path) -> bool:
    listed, checked = _listed_and_checked()
    all_passed = bool(listed) and listed == checked
    memo.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=memo.parent, suffix=".partial", delete=False) as partial:
        json.dump({"listed": listed, "checked": checked, "all_passed": all_passed}, partial)
    os.replace(partial.name, memo)
    return all_passed


@functools.cache
def trusted_isa_options() -> dict[str, bool]:
    """Inductor options that skip its per-process instruction-set checks where this machine passed them all
    before (run and recorded here the first time); {} where they must run."""
    from torch._inductor import config

    if platform.machine() not in ("x86_64", "AMD64") or config.cpp.vec_isa_ok is not None:
        return {}  # no such checks there, or the user decided (TORCHINDUCTOR_VEC_ISA_OK)
    try:
        memo = memo_dir() / f"{_machine_key()}.json"
        all_passed = _recorded(memo)
        if all_passed is None:
            all_passed = _check_and_record(memo)
    except (OSError, RuntimeError) as error:  # no C++ compiler (inductor says so itself), a read-only cache, ...
        logger.info("inductor checks the vector instruction sets in every process: %s", error)
        return {}
    return {"cpp.vec_isa_ok": True} if all_passed else {}
