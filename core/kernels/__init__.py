"""Our own CPU kernels, C++ compiled once per machine and torch release, registered as `torch.ops.recipes_scaffold`.

`cpu_kernels()` builds (~40 s on 2 cores, the first time) and loads them, or says why this machine cannot: no AVX-512
BF16, no C++ compiler, a failed build (its log is kept beside the cache). Callers fall back to torch's own kernels
then. `int_groups_avx512.cpp`: matrix products with integer weights in groups of 32; `float_rows_avx512.cpp`: with
bfloat16 or float32 weights laid out in runs of 32 rows; `decode_attention_avx512.cpp`:
one query per row attending to a static cache; `row_argmax_avx512.cpp`: greedy decoding's argmax over a row of
logits. Each op also has a C entry point (`aoti_shim.h`) that a decode step compiled ahead of time calls directly
(`c_shim_options`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("int_groups_avx512.cpp", "float_rows_avx512.cpp", "decode_attention_avx512.cpp",
                        "row_argmax_avx512.cpp")]
HEADERS = [Path(__file__).with_name("aoti_shim.h")]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c")
GROUP = 32
ROWS = 16


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "recipes-scaffold" / "kernels"


def missing_cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(REQUIRED_CPU_FLAGS)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]


def compile_command(sources: list[Path], target: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [
        os.environ.get("CXX", "g++"), "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
        *map(str, sources), "-o", str(target),
        # torch's own libgomp, so that the kernel's threads are torch's threads
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]


def built_library() -> Path:
    """The compiled kernel library, built into the cache when this source, torch and Python have none yet."""
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels_avx512-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.with_suffix(".log")
    print("building the AVX-512 CPU kernels (once per machine, under a minute)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        command = compile_command(SOURCES, partial)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        log.write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"the kernel build failed, see {log}")
        os.replace(partial, target)
    return target


@functools.cache
def cpu_kernels() -> str | None:
    """Load the AVX-512 kernels; returns None when loaded, else why they are not available."""
    reason = load_cpu_kernels()
    if reason is not None:
        logger.warning("integer weight groups, decode attention and greedy argmax run on torch's kernels: the "
                       "AVX-512 kernels are not available (%s)", reason)
    return reason


def load_cpu_kernels() -> str | None:
    missing = missing_cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) to build it"
    try:
        library = built_library()
        torch.ops.load_library(str(library))
        # Global, so that a library AOTInductor compiled against the kernels' C entry points finds them.
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except (RuntimeError, OSError) as error:
        return str(error)

    def int_groups_output(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0] // (x.shape[1] // GROUP) * ROWS), dtype=torch.float32)

    torch.library.register_fake("recipes_scaffold::int4_groups_mm")(int_groups_output)
    torch.library.register_fake("recipes_scaffold::int4_symmetric_groups_mm")(int_groups_output)
    torch.library.register_fake("recipes_scaffold::int8_groups_mm")(int_groups_output)

    @torch.library.register_fake("recipes_scaffold::float_rows_mm")
    def _(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0] // x.shape[1]))

    @torch.library.register_fake("recipes_scaffold::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty((q.shape[0], 1, q.shape[1], v.shape[3]))

    @torch.library.register_fake("recipes_scaffold::row_argmax")
    def _(logits):
        return logits.new_empty(logits.shape[:1], dtype=torch.long)

    return None


C_SHIMS = {
    "int4_groups_mm": "AtenTensorHandle x, AtenTensorHandle weight",
    "int4_symmetric_groups_mm": "AtenTensorHandle x, AtenTensorHandle weight",
    "int8_groups_mm": "AtenTensorHandle x, AtenTensorHandle weight",
    "float_rows_mm": "AtenTensorHandle x, AtenTensorHandle weight",
    "decode_attention": "AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v, AtenTensorHandle mask, "
                        "double scale",
    "row_argmax": "AtenTensorHandle logits",
}


def c_shim_options() -> dict:
    """AOTInductor's options for calling the kernels through their C entry points (`aoti_shim.h`); none where the
    kernels are not loaded."""
    if cpu_kernels() is not None:
        return {}
    return {"aot_inductor.custom_ops_to_c_shims": {
        getattr(torch.ops.recipes_scaffold, op).default:
            [f"AOTITorchError aoti_torch_cpu_{op}({arguments}, AtenTensorHandle* result)"]
        for op, arguments in C_SHIMS.items()}}
