"""Compile cost of the SmolLM2 port in `inductor`: a new process's seconds to its first 32 tokens, cold and warm.

    python bench/compile_cost.py [--configs kept-q4_1 int4 bf16 fp32] [--json results/bench_compile_cost.json]

For each configuration, two processes in turn share one new, empty inductor cache folder (TORCHINDUCTOR_CACHE_DIR):
the first compiles everything (cold), the second finds the first one's FX graphs there (warm). A figure is the wall
time from starting `python` to the 32nd generated token of one prompt (batch 1), interpreter start and imports
included; each process then generates again and counts what that second run compiled (0 expected). The
CPU kernels are built once per machine into their own cache beforehand (`core/kernels`) and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "kept-q4_1": "GGUF Q4_1 codes kept (the demo's configuration)",
    "int4": "weight_quant: int4 on the float import",
    "bf16": "bfloat16 float weights (on the float-rows kernel where the CPU has it)",
    "fp32": "float32 float weights (on the float-rows kernel where the CPU has it)",
}
PROMPT = "What is the capital of France?"
NEW_TOKENS = 32


def child(config: str) -> None:
    """Runs in the measured process: load, compile, 32 tokens; then a second run for its recompiles."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from real_model import CHECKPOINT, KEPT_CHECKPOINT, PortContender

    torch.set_grad_enabled(False)
    options = {"kept-q4_1": {"checkpoint": KEPT_CHECKPOINT, "quant_weight_mode": "packed"},
               "int4": {"checkpoint": CHECKPOINT, "weight_quant": "int4"}, "bf16": {"checkpoint": CHECKPOINT},
               "fp32": {"checkpoint": CHECKPOINT}}[config]
    dtype = "float32" if config == "fp32" else "bfloat16"
    contender = PortContender(dtype, "inductor", 1, NEW_TOKENS, **options)
    contender.runner.model_generate([PROMPT], ignore_eos=True)
    print("READY", flush=True)
    again = contender.runner.model_generate([PROMPT], ignore_eos=True)
    frames = again.timing["recompiles_after_warmup"]
    print(json.dumps({"recompiles_after_warm_up": frames, "decode_ms_p50": again.timing["decode_ms_p50"]}),
          flush=True)


def timed_process(config: str, cache_dir: str, log) -> dict:
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", config], stdout=subprocess.PIPE, stderr=log,
                               text=True, env=environment)
    ready_s = None
    result = {}
    for line in process.stdout:
        if line.startswith("READY"):
            ready_s = time.perf_counter() - started
        elif line.startswith("{"):
            result = json.loads(line)
    if process.wait() != 0 or ready_s is None:
        raise SystemExit(f"the {config} process failed (exit {process.returncode}), see {log.name}")
    return {"ready_s": round(ready_s, 1), **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["kept-q4_1"], choices=list(CONFIGS))
    parser.add_argument("--json", type=Path, default=Path("results/bench_compile_cost.json"))
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from machine import cpu_model
    from real_model import CHECKPOINT, KEPT_CHECKPOINT

    from core.gguf_import import import_gguf, packaged_smollm2_gguf
    from core.kernels import cpu_kernels

    import_gguf(packaged_smollm2_gguf(), CHECKPOINT)
    import_gguf(packaged_smollm2_gguf(), KEPT_CHECKPOINT, keep_quantized=True)
    cpu_kernels()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.json.with_suffix(".log")
    rows = []
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="inductor-cache-") as scratch:
        for config in args.configs:
            cache_dir = str(Path(scratch) / config)
            cold = timed_process(config, cache_dir, log)
            warm = timed_process(config, cache_dir, log)
            rows.append({"config": config, "cold_s": cold["ready_s"], "warm_s": warm["ready_s"],
                         "recompiles_after_warm_up": max(cold["recompiles_after_warm_up"],
                                                         warm["recompiles_after_warm_up"])})
            print(f"{config:<10} {CONFIGS[config]:<48} cold {cold['ready_s']:6.1f} s   warm {warm['ready_s']:6.1f} s"
                  f"   recompiles after warm-up {rows[-1]['recompiles_after_warm_up']}", flush=True)
    print(f"SmolLM2-135M-Instruct, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"process start to {NEW_TOKENS} tokens; library logs in {log_path}")
    args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
