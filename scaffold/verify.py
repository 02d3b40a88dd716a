"""Prove a port against HF eager on the same weights.

HF's own model runs `generate` greedily on a left-padded batch; the port then runs twice on the same prompts:
teacher-forced with HF's tokens (every step's logits must agree within `tolerance`) and free-running (its greedy
tokens must equal HF's, except where HF's own top-2 logit gap at that step is below `tolerance`: a near tie that
reduction order may flip).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from core.model_runner import ModelRunner
from core.quantization import PackedWeight
from core.sampling import SamplingParams
from core.split import split_checkpoint
from scaffold.rank_pool import active_pool, rank_failure, serve
from scaffold.tiny import build_tiny_checkpoint

__all__ = [
    "DEFAULT_PROMPTS",
    "DistributedCase",
    "VerifyReport",
    "build_tiny_checkpoint",
    "hf_reference",
    "verify_port",
    "verify_port_distributed",
    "verify_port_distributed_cases",
]

DEFAULT_PROMPTS = (
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "In a hole in the ground there lived a hobbit",
)


@dataclass
class Mismatch:
    row: int
    step: int
    hf_token: int
    port_token: int
    hf_top2_gap: float


@dataclass
class VerifyReport:
    rows: int
    steps: int
    tolerance: float
    max_abs_logit_diff: float
    mismatches: list[Mismatch] = field(default_factory=list)
    world_size: int = 1
    parameter_bytes_per_rank: int = 0
    exe_mode: str = "eager"
    recompiles_after_warmup: int = 0
    # Weights kept quantized (quant_weight_mode: packed): their bytes, and what they would take in bf16.
    packed_bytes_per_rank: int = 0
    packed_bf16_bytes_per_rank: int = 0

    @property
    def near_ties(self) -> list[Mismatch]:
        return [mismatch for mismatch in self.mismatches if mismatch.hf_top2_gap < self.tolerance]

    @property
    def passed(self) -> bool:
        return (
            self.max_abs_logit_diff <= self.tolerance
            and len(self.near_ties) == len(self.mismatches)
            and self.recompiles_after_warmup == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VerifyReport":
        fields = {key: value for key, value in data.items() if key != "passed"}
        fields["mismatches"] = [Mismatch(**mismatch) for mismatch in fields["mismatches"]]
        return cls(**fields)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"{verdict} at TP={self.world_size}, {self.exe_mode} "
            f"({self.parameter_bytes_per_rank} parameter bytes per rank, "
            f"{self.recompiles_after_warmup} recompiles after warm-up): "
            f"{self.rows} prompts x {self.steps} steps; teacher-forced logits max |port - HF| = "
            f"{self.max_abs_logit_diff:.3e} (tolerance {self.tolerance:.0e}); greedy tokens differ in "
            f"{len(self.mismatches)} rows, {len(self.near_ties)} of them at HF near-ties"
        ]
        lines += [
            f"  row {mismatch.row} step {mismatch.step}: HF {mismatch.hf_token}, port {mismatch.port_token}, "
            f"HF top-2 gap {mismatch.hf_top2_gap:.3e}"
            for mismatch in self.mismatches
        ]
        return "\n".join(lines)


def _hf_causal_lm(checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's model as HF's auto class builds it, or — for a text model the auto mapping does not list
    (Mllama's and Emu3's text configs) — the class its config.json's `architectures` names."""
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, trust_remote_code=True)
    except ValueError as error:
        architectures = json.loads((Path(checkpoint) / "config.json").read_text()).get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None or "Unrecognized configuration class" not in str(error):
            raise
        model = model_class.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def hf_reference(checkpoint: Path, prompts: list[str], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF eager greedy tokens [batch, steps] and raw logits [batch, steps, vocab] (fp32, CPU, EOS ignored)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    # A model whose code ships with its checkpoint (config.json's auto_map) is its own reference: HF runs
    # that code, as `trust_remote_code` users do; the port was generated from the same files without running them.
    model = _hf_causal_lm(checkpoint)
    # generate() falls back to the checkpoint's generation_config for an eos_token_id left unset: clear it
    # there, or HF stops a row at EOS and pads it while the port (ignoring EOS) goes on.
    model.generation_config.eos_token_id = None
    # BART-family checkpoints force EOS at the length limit (and BOS first): plain greedy decoding is the reference.
    model.generation_config.forced_eos_token_id = model.generation_config.forced_bos_token_id = None
    batch = tokenizer(list(prompts), padding="longest", return_tensors="pt")
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        output = model.generate(**batch, generation_config=generation_config)
    tokens = output.sequences[:, batch["input_ids"].shape[1]:]
    return tokens, torch.stack(output.logits, dim=1).float()


def verify_port(
    runner_class: type[ModelRunner],
    checkpoint: str | Path,
    prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 24,
    tolerance: float = 1e-4,
    settings_overrides: dict[str, Any] | None = None,
    exe_mode: str = "eager",
    reference_checkpoint: str | Path | None = None,
) -> VerifyReport:
    """In a graph mode the teacher-forced run compiles every graph; the free run then warms up once more and
    must recompile nothing. reference_checkpoint: the folder HF eager runs on, where it cannot load
    `checkpoint` itself right (FP8 with partial edge blocks: the same weights dequantized by the format's math)."""
    checkpoint = Path(checkpoint)
    prompts = list(prompts)
    hf_tokens, hf_logits = hf_reference(Path(reference_checkpoint or checkpoint), prompts, max_new_tokens)

    overrides = {"exe_mode": exe_mode, **(settings_overrides or {})}
    runner = runner_class(verification_settings(runner_class, checkpoint, len(prompts), max_new_tokens, overrides))
    runner.init_model()
    forced = runner.model_generate(prompts, teacher_tokens=hf_tokens.to(runner.device), ignore_eos=True,
                                   keep_logits=True)
    port_logits = torch.stack(forced.step_logits, dim=1)
    max_abs_diff = (port_logits - hf_logits).abs().max().item()

    # The reference is greedy whatever the checkpoint's generation_config.json asks for.
    free = runner.model_generate(prompts, ignore_eos=True, warm_up=exe_mode != "eager", sampling=SamplingParams())
    port_tokens = torch.tensor(free.output_token_ids)
    top2 = hf_logits.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    mismatches = []
    for row in range(len(prompts)):
        differing = (port_tokens[row] != hf_tokens[row]).nonzero()
        if len(differing):
            step = int(differing[0])
            mismatches.append(Mismatch(row, step, int(hf_tokens[row, step]), int(port_tokens[row, step]),
                                       float(gaps[row, step])))
    packed = [module for module in runner.model.modules() if isinstance(module, PackedWeight)]
    parameter_bytes = sum(param.numel() * param.element_size() for param in runner.model.parameters())
    return VerifyReport(len(prompts), max_new_tokens, tolerance, max_abs_diff, mismatches, runner.world_size,
                        parameter_bytes + sum(module.packed_bytes() for module in packed), exe_mode,
                        free.timing["recompiles_after_warmup"],
                        packed_bytes_per_rank=sum(module.packed_bytes() for module in packed),
                        packed_bf16_bytes_per_rank=sum(2 * module.dequantized_numel() for module in packed))


@dataclass(frozen=True)
class DistributedCase:
    """One verification inside a shared torchrun launch: a checkpoint, read online from the original or, with
    `offline_split_dir`, split there first and read by each rank from its rank_{i} folder.
    settings: runner_settings overrides (e.g. {"model_config": {"quant_weight_mode": "packed"}});
    reference_checkpoint: as in `verify_port`."""

    checkpoint: Path
    offline_split_dir: Path | None = None
    settings: dict[str, Any] | None = None
    reference_checkpoint: Path | None = None


def verify_port_distributed(
    runner_path: str,
    checkpoint: str | Path,
    world_size: int = 2,
    offline_split_dir: Path | None = None,
    timeout_s: float = 600,
) -> VerifyReport:
    """`verify_port` at TP=`world_size`: torchrun starts the ranks (gloo on CPU), rank 0 reports.

    runner_path: "package.module:RunnerClass". offline_split_dir: split the checkpoint there first and have the
    ranks read their rank_{i} folders (enable_online_split_weight: false) instead of slicing the original.
    """
    case = DistributedCase(Path(checkpoint), offline_split_dir)
    return verify_port_distributed_cases(runner_path, {"case": case}, world_size, timeout_s)["case"]


def verify_port_distributed_cases(
    runner_path: str,
    cases: dict[str, DistributedCase],
    world_size: int = 2,
    timeout_s: float = 600,
) -> dict[str, VerifyReport]:
    """Several `verify_port_distributed` runs in one torchrun launch: the ranks start and import once, then
    verify each case in turn. Returns the reports by case name. Inside `scaffold.rank_pool.shared_launches()` the
    cases go to that launch, kept up between calls."""
    launched = {name: _launched_case(runner_path, case, world_size) for name, case in cases.items()}
    pool = active_pool(world_size)
    if pool is not None:
        reports = pool.run(runner_path, launched, timeout_s)
        return {name: VerifyReport.from_json(reports[name]) for name in cases}
    with tempfile.TemporaryDirectory() as scratch:
        cases_path, reports_path = Path(scratch) / "cases.json", Path(scratch) / "reports.json"
        cases_path.write_text(json.dumps(launched))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "-m", "scaffold.verify", "--runner", runner_path, "--cases", str(cases_path), "--json", str(reports_path),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0 or not reports_path.exists():
            raise RuntimeError(f"torchrun verification failed (exit {result.returncode}): "
                               f"{rank_failure(result.stderr)}\n{result.stderr[-4000:]}")
        reports = json.loads(reports_path.read_text())
        return {name: VerifyReport.from_json(reports[name]) for name in cases}


def _launched_case(runner_path: str, case: DistributedCase, world_size: int) -> dict[str, Any]:
    """The case as the ranks read it: the checkpoint and the runner_settings overrides for TP=`world_size`."""
    overrides: dict[str, Any] = {
        "world_size": world_size,
        "parallel_config": {f"{group}_size": world_size for group in ("attn_tp", "moe_tp", "lmhead_tp", "embed_tp")},
        "model_config": dict((case.settings or {}).get("model_config", {})),
    }
    overrides.update((key, value) for key, value in (case.settings or {}).items() if key != "model_config")
    if case.offline_split_dir is not None:
        runner_class = _import_runner(runner_path)
        base = verification_settings(runner_class, case.checkpoint, len(DEFAULT_PROMPTS), 24, overrides)
        split_checkpoint(runner_class, base, case.offline_split_dir, show_progress=False)
        overrides["model_path"] = str(case.offline_split_dir)
        overrides["model_config"]["enable_online_split_weight"] = False
    reference = str(case.reference_checkpoint) if case.reference_checkpoint else None
    return {"checkpoint": str(case.checkpoint), "overrides": overrides, "reference_checkpoint": reference}


def verify_launched_cases(runner_path: str, cases: dict[str, dict[str, Any]]) -> dict[str, VerifyReport]:
    """A rank's part: every case, in `_launched_case`'s form, verified in turn."""
    runner_class = _import_runner(runner_path)
    return {name: verify_port(runner_class, case["checkpoint"], settings_overrides=case["overrides"],
                              reference_checkpoint=case.get("reference_checkpoint"))
            for name, case in cases.items()}


def _import_runner(runner_path: str) -> type[ModelRunner]:
    module_name, _, class_name = runner_path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a port against HF eager (run under torchrun for TP>1).")
    parser.add_argument("--runner", help="package.module:RunnerClass")
    parser.add_argument("--cases", type=Path,
                        help='JSON file: {"name": {"checkpoint": DIR, "overrides": {runner_settings overrides}}}')
    parser.add_argument("--json", type=Path, help="rank 0 writes the reports here, by case name")
    parser.add_argument("--serve", type=Path, metavar="FOLDER",
                        help="instead: verify the requests a RankPool writes into FOLDER (scaffold.rank_pool)")
    parser.add_argument("--client-pid", type=int, help="with --serve: leave when this process is gone")
    args = parser.parse_args(argv)
    if args.serve:
        if args.client_pid is None:
            parser.error("--serve FOLDER needs --client-pid PID (the process the ranks serve)")
        return serve(args.serve, args.client_pid, lambda runner, cases: {
            name: report.to_json() for name, report in verify_launched_cases(runner, cases).items()})
    if not (args.runner and args.cases):
        parser.error("--runner and --cases are required (or --serve FOLDER --client-pid PID)")
    reports = verify_launched_cases(args.runner, json.loads(args.cases.read_text()))
    if int(os.environ.get("RANK", 0)) == 0:
        for name, report in reports.items():
            print(f"{name}: {report.summary()}")
        if args.json:
            args.json.write_text(json.dumps({name: report.to_json() for name, report in reports.items()}, indent=2))
    return 0


def verification_settings(runner_class, checkpoint: Path, batch_size: int, max_new_tokens: int,
                           overrides: dict[str, Any]) -> dict[str, Any]:
    settings = {
        "model_name": runner_class.__name__,
        "model_path": str(checkpoint),
        "exe_mode": "eager",
        "world_size": 1,
        "model_config": {"dtype": "float32", "device": "cpu"},
        "data_config": {"input_max_len": 64, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            settings.setdefault(key, {}).update(value)
        else:
            settings[key] = value
    return settings


if __name__ == "__main__":
    sys.exit(main())
