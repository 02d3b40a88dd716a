"""Peak RSS growth per rank while loading a synthetic ~1 GiB gpt_oss checkpoint with online split at TP=2.

    python bench/tp_load_memory.py [--workdir DIR] [--tp 2]

Builds the checkpoint once (HF's GptOssForCausalLM, uninitialised weights, fp32), then launches torchrun with
`--tp` ranks; each rank measures VmRSS just before `init_model()` and VmHWM (peak) just after, and rank 0 prints
a table and the parameter bytes each rank holds. Online split should keep each rank near its share of the
checkpoint: safetensors slices are read from a memory map, never a whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30
CONFIG = dict(hidden_size=1024, intermediate_size=1024, num_local_experts=16, num_experts_per_tok=2,
              num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=32768)


def build_checkpoint(folder: Path) -> int:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.initialization import no_init_weights

    from scaffold.tiny import build_tiny_tokenizer

    if not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists():
        with no_init_weights():
            model = GptOssForCausalLM(GptOssConfig(**CONFIG)).to(torch.float32)
        model.save_pretrained(folder, max_shard_size="300MB")
        build_tiny_tokenizer().save_pretrained(folder)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rank_main(checkpoint: str, tp: int, out: str) -> None:
    import torch.distributed as dist

    from generated_models.gpt_oss.runner_gpt_oss import GptOssRunner

    sizes = {f"{group}_size": tp for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")}
    runner = GptOssRunner({"model_name": "gpt_oss", "model_path": checkpoint, "world_size": tp,
                           "model_config": {"dtype": "float32", "device": "cpu"}, "parallel_config": sizes})
    before = memory_kib("VmRSS")
    runner.init_model()
    peak = memory_kib("VmHWM")
    held = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    row = {"rank": runner.global_rank, "rss_before_gib": before / 2**20, "peak_gib": peak / 2**20,
           "growth_gib": (peak - before) / 2**20, "parameters_gib": held / GIB}
    rows = [None] * tp
    dist.all_gather_object(rows, row)
    if runner.global_rank == 0:
        Path(out).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recipes-bench-1gib")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rank-worker", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_main(args.rank_worker[0], args.tp, args.rank_worker[1])
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_bytes = build_checkpoint(args.workdir)
    out = args.workdir / "rss.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
                    __file__, "--tp", str(args.tp), "--rank-worker", str(args.workdir), str(out)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())
    print(f"checkpoint: {checkpoint_bytes / GIB:.3f} GiB on disk, online split over TP={args.tp}")
    print("rank | RSS before init_model | peak after | growth | parameters held")
    for row in rows:
        print(f"{row['rank']:>4} | {row['rss_before_gib']:>17.3f} GiB | {row['peak_gib']:>6.3f} GiB | "
              f"{row['growth_gib']:.3f} GiB | {row['parameters_gib']:.3f} GiB")
    worst = max(row["growth_gib"] for row in rows)
    print(f"worst peak RSS growth per rank: {worst:.3f} GiB ({worst * GIB / checkpoint_bytes:.0%} of the checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
