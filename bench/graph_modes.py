"""Decode speed of the gpt_oss port per exe_mode, in one process on the same tiny checkpoint.

    python bench/graph_modes.py [--modes eager inductor] [--new-tokens 32] [--repeats 3] [--json FILE]

Each mode warms up (compiling its graphs); then the modes generate in turn, `--repeats` rounds, so that a
machine's drift hits all of them alike. The table reports the median over rounds of each run's median decode
step, and the median over rounds of the per-round ratio to the first mode. Read the ratio, not the absolute
milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner
from scaffold.verify import DEFAULT_PROMPTS, build_tiny_checkpoint


def build_runner(checkpoint: Path, mode: str, new_tokens: int) -> GptOssRunner:
    runner = GptOssRunner({
        "model_name": "gpt_oss", "model_path": str(checkpoint), "exe_mode": mode,
        "model_config": {"dtype": "float32", "device": "auto"},
        "data_config": {"input_max_len": 64, "max_new_tokens": new_tokens, "batch_size": len(DEFAULT_PROMPTS)},
    })
    runner.init_model()
    return runner


def measure(checkpoint: Path, modes: list[str], new_tokens: int, repeats: int) -> list[dict]:
    runners = {mode: build_runner(checkpoint, mode, new_tokens) for mode in modes}
    warm = {mode: runner.model_generate(list(DEFAULT_PROMPTS), warm_up=True, ignore_eos=True).timing
            for mode, runner in runners.items()}
    rounds = [{mode: runner.model_generate(list(DEFAULT_PROMPTS), ignore_eos=True).timing
               for mode, runner in runners.items()} for _ in range(repeats)]
    rows = []
    for mode in modes:
        runs = [round_[mode] for round_ in rounds]
        rows.append({
            "mode": mode,
            "compile_s": warm[mode]["compile_s"],
            "recompiles_after_warmup": warm[mode]["recompiles_after_warmup"] + sum(
                run["recompiles_after_warmup"] for run in runs),
            "decode_ms_p50": statistics.median(run["decode_ms_p50"] for run in runs),
            "speedup_vs_first": round(statistics.median(
                round_[modes[0]]["decode_ms_p50"] / round_[mode]["decode_ms_p50"] for round_ in rounds), 2),
            "prefill_ms": statistics.median(run["prefill_ms"] for run in runs),
            "decode_tokens_per_s": statistics.median(run["decode_tokens_per_s"] for run in runs),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["eager", "inductor"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_tiny_checkpoint("gpt_oss", Path(folder) / "tiny-gpt_oss")
        rows = measure(checkpoint, args.modes, args.new_tokens, args.repeats)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"tiny gpt_oss, batch {len(DEFAULT_PROMPTS)}, {args.new_tokens} new tokens, fp32, {device}, "
          f"torch {torch.__version__}")
    print(f"{'mode':<10} {'decode ms p50':>14} {'speed-up':>9} {'tokens/s':>9} {'prefill ms':>11} "
          f"{'compile s':>10} {'recompiles':>10}")
    for row in rows:
        print(f"{row['mode']:<10} {row['decode_ms_p50']:>14.2f} {row['speedup_vs_first']:>8.2f}x "
              f"{row['decode_tokens_per_s']:>9.1f} {row['prefill_ms']:>11.1f} {row['compile_s']:>10.1f} "
              f"{row['recompiles_after_warmup']:>10}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
