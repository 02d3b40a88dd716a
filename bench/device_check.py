"""The CUDA paths on a real GPU: each port exact against HF in every mode, then decode speed against HF and the roofline.

    python bench/device_check.py                      # on a GPU: everything below, a few minutes on an H100/H200
    python bench/device_check.py --device cpu --models llama --modes eager --speed-model tiny   # the test suite's

1. verify: the generated regression (`verify_port`) of tiny random `llama`, `qwen3_moe` and `gpt_oss` checkpoints in
   every mode of the device, fp32 and bf16, counting recompiles after warm-up. fp32 must agree with HF's fp32 CPU
   logits within 1e-4, as on the CPU. bf16 cannot: every weight and activation rounds to 8 significant bits. Its
   tolerance is measured, not chosen: HF's own model, cast to bf16 on the same device, runs the same teacher-forced
   tokens in one forward, and its largest logit error against fp32 HF is the bf16 error of the reference itself;
   the port may be off by up to BF16_TOLERANCE_FACTOR times that.
2. speed: a llama-shaped checkpoint (1B: Llama 3.2 1B's shapes, random bf16 weights written on the device) at
   batch 1 and 16: HF eager `generate`, HF `generate` with its static cache (which transformers compiles on CUDA),
   and the port in each mode, in one process, every contender's warm-up first, then rounds in turn. A run of
   N new tokens and one of 1 new token are timed end to end; prefill is the latter, decode tokens/s is
   batch x (N - 1) / (T_N - T_1). The device's read bandwidth is measured in the same run: the roofline is the
   weights (and KV cache) read once per decode step at that bandwidth.

Writes device_check.json and device_check.md to --out (results/device_check by default) as it goes, and the
libraries' logs to device_check.log beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.backends import BACKENDS
from library_logs import libraries_log_to
from machine import cpu_model, read_bandwidth_gb_s
from core.sampling import SamplingParams
from scaffold.tiny import TRAINING_TEXT, build_tiny_checkpoint, build_tiny_tokenizer
from scaffold.verify import DEFAULT_PROMPTS, _hf_causal_lm, hf_reference, verify_port

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE_FACTOR = 3.0
VERIFY_NEW_TOKENS = 16
RUNNERS = {
    "llama": "generated_models.llama.runner_llama:LlamaRunner",
    "qwen3_moe": "generated_models.qwen3_moe.runner_qwen3_moe:Qwen3MoeRunner",
    "gpt_oss": "generated_models.gpt_oss.runner_gpt_oss:GptOssRunner",
}
# Llama 3.2 1B's shapes (1.24B parameters, tied embeddings); tiny: the test suite's.
SPEED_MODELS = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384, "tie_word_embeddings": True},
}
PROMPT_TOKENS = 96

logger = logging.getLogger("device_check")


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    folder: Path
    meta: dict[str, Any]

    def __post_init__(self):
        self.verify: list[dict[str, Any]] = []
        self.speed: list[dict[str, Any]] = []
        self.speed_meta: dict[str, Any] = {}

    def save(self) -> None:
        """Rewritten after every case: a run cut short still leaves what it measured."""
        data = {**self.meta, "verify": self.verify, "speed_setup": self.speed_meta, "speed": self.speed}
        _write(self.folder / "device_check.json", json.dumps(data, indent=2) + "\n")
        _write(self.folder / "device_check.md", self.markdown())

    def markdown(self) -> str:
        lines = [f"Device: {self.meta['device_name']}; torch {self.meta['torch']}, transformers "
                 f"{self.meta['transformers']}; `{self.meta['command']}`", ""]
        if self.verify:
            lines += ["| model | mode | dtype | max \\|port - HF\\| | tolerance | HF's own bf16 error | "
                      "greedy tokens | recompiles | result |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for row in self.verify:
                if "error" in row:
                    lines.append(f"| {row['model']} | {row['mode']} | {row['dtype']} | | | | | | "
                                 f"ERROR: {row['error']} |")
                    continue
                own = f"{row['hf_bf16_error']:.2e}" if row.get("hf_bf16_error") is not None else ""
                lines.append(
                    f"| {row['model']} | {row['mode']} | {row['dtype']} | {row['max_abs_logit_diff']:.2e} | "
                    f"{row['tolerance']:.1e} | {own} | {row['token_rows_equal']}/{row['rows']} rows equal, "
                    f"{row['near_ties']} near ties | {row['recompiles_after_warmup']} | "
                    f"{'PASS' if row['passed'] else 'FAIL'} |")
            lines.append("")
        if self.speed:
            setup = self.speed_meta
            lines += [f"{setup['model']}: {setup['parameters'] / 1e6:,.0f}M parameters, bf16, {setup['prompt_tokens']}"
                      f"-token prompts, {setup['new_tokens']} new tokens, median of {setup['rounds']} rounds; read "
                      f"bandwidth {setup['read_gb_per_s']:.0f} GB/s", "",
                      "| batch | contender | prefill ms | decode tokens/s | x HF eager | x HF static+compile | "
                      "roofline |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for row in self.speed:
                if "error" in row:
                    lines.append(f"| {row['batch']} | {row['contender']} | | | | | ERROR: {row['error']} |")
                    continue
                lines.append(
                    f"| {row['batch']} | {row['contender']} | {row['prefill_ms']:.1f} | "
                    f"{row['decode_tokens_per_s']:.1f} | {_ratio(row.get('vs_hf_eager'))} | "
                    f"{_ratio(row.get('vs_hf_static_compile'))} | {row['roofline_fraction']:.0%} |")
        return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _error_line(error: BaseException) -> str:
    logger.error("%s", "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def progress(message: str) -> None:
    print(message, flush=True)


def compile_counters(since: dict[str, int] | None = None) -> dict[str, int]:
    """Graph breaks and CUDA graphs inductor declined to record (each a silent slow path), counted since `since`."""
    from torch._dynamo.utils import counters

    now = {"graph_breaks": sum(counters["graph_break"].values()),
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    return {key: value - (since or {}).get(key, 0) for key, value in now.items()}


# ---------------------------------------------------------------------------------------------------- verify
def hf_bf16_error(checkpoint: Path, hf_tokens: torch.Tensor, hf_logits: torch.Tensor, device: str) -> float:
    """The largest logit error of HF's own model in bf16 on `device` against its fp32 reference, over the same
    teacher-forced tokens: prompt and reference tokens in one forward, logits read where each token is chosen."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    batch = tokenizer(list(DEFAULT_PROMPTS), padding="longest", return_tensors="pt")
    input_ids = torch.cat([batch["input_ids"], hf_tokens], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(hf_tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model = _hf_causal_lm(checkpoint).to(device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device)).logits
    prompt_length, steps = batch["input_ids"].shape[1], hf_tokens.shape[1]
    chosen_at = logits[:, prompt_length - 1: prompt_length - 1 + steps].float().cpu()
    return float((chosen_at - hf_logits).abs().max())


def run_verify(report: Report, models: list[str], modes: list[str], dtypes: list[str], device: str,
               scratch: Path) -> None:
    from scaffold.verify import _import_runner

    for model_type in models:
        checkpoint = build_tiny_checkpoint(model_type, scratch / f"tiny-{model_type}")
        runner_class = _import_runner(RUNNERS[model_type])
        own_error = None
        if "bfloat16" in dtypes:
            hf_tokens, hf_logits = hf_reference(checkpoint, list(DEFAULT_PROMPTS), VERIFY_NEW_TOKENS)
            own_error = hf_bf16_error(checkpoint, hf_tokens, hf_logits, device)
        for dtype in dtypes:
            tolerance = FP32_TOLERANCE if dtype == "float32" else max(FP32_TOLERANCE, BF16_TOLERANCE_FACTOR * own_error)
            for mode in modes:
                row: dict[str, Any] = {"model": model_type, "mode": mode, "dtype": dtype}
                counted = compile_counters()
                started = time.perf_counter()
                try:
                    result = verify_port(runner_class, checkpoint, max_new_tokens=VERIFY_NEW_TOKENS,
                                         tolerance=tolerance, exe_mode=mode,
                                         settings_overrides={"model_config": {"device": device, "dtype": dtype}})
                    row.update(
                        passed=result.passed, max_abs_logit_diff=result.max_abs_logit_diff, tolerance=tolerance,
                        hf_bf16_error=own_error if dtype == "bfloat16" else None, rows=result.rows,
                        steps=result.steps, token_rows_equal=result.rows - len(result.mismatches),
                        near_ties=len(result.near_ties), recompiles_after_warmup=result.recompiles_after_warmup,
                    )
                except Exception as error:  # noqa: BLE001 - one case's failure is reported; the others still run
                    row.update(passed=False, error=_error_line(error))
                row["seconds"] = round(time.perf_counter() - started, 1)
                row.update(compile_counters(since=counted))
                report.verify.append(row)
                report.save()
                progress(f"verify {model_type:<9} {mode:<10} {dtype:<8} "
                         + (f"ERROR {row['error']}" if "error" in row else
                            f"{'PASS' if row['passed'] else 'FAIL'} max|diff| {row['max_abs_logit_diff']:.2e} "
                            f"(tol {tolerance:.1e}), recompiles {row['recompiles_after_warmup']}")
                         + f" [{row['seconds']} s]")


# ---------------------------------------------------------------------------------------------------- speed
def speed_prompts(tokenizer, count: int) -> list[str]:
    """`count` different prompts of PROMPT_TOKENS tokens each (as the checkpoint's tokenizer counts them)."""
    ids = tokenizer(" ".join(TRAINING_TEXT.split()) * 4, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[7 * row: 7 * row + PROMPT_TOKENS]) for row in range(count)]


def build_speed_checkpoint(size: str, folder: Path, device: str) -> Path:
    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model("llama", **SPEED_MODELS[size], max_position_embeddings=4096,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Contender:
    name: str

    def generate(self, prompts: list[str], new_tokens: int) -> None:
        raise NotImplementedError


class HfContender(Contender):
    def __init__(self, name: str, model, tokenizer, cache_implementation: str | None):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.cache_implementation = cache_implementation

    def generate(self, prompts: list[str], new_tokens: int) -> None:
        batch = self.tokenizer(prompts, padding="longest", return_tensors="pt").to(self.model.device)
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id,
                                  cache_implementation=self.cache_implementation)
        with torch.inference_mode():
            self.model.generate(**batch, generation_config=config)


class PortContender(Contender):
    def __init__(self, checkpoint: Path, mode: str, device: str, batch: int, new_tokens: int,
                 model_attention_in_decode: bool = False):
        """model_attention_in_decode: decode steps keep the model's attention implementation instead of the
        backend's `decode_attention` (what the backend's choice gains)."""
        from generated_models.llama.runner_llama import LlamaRunner

        self.runner = LlamaRunner({
            "model_name": "llama", "model_path": str(checkpoint), "exe_mode": mode,
            "model_config": {"dtype": "bfloat16", "device": device},
            "data_config": {"input_max_len": 128, "max_new_tokens": new_tokens, "batch_size": batch},
        })
        self.runner.init_model()
        self.name = f"port {mode}"
        if model_attention_in_decode:
            self.runner.backend.decode_attention = lambda model_attention: model_attention
            self.name += f" ({self.runner.model.config._attn_implementation} decode)"

    def generate(self, prompts: list[str], new_tokens: int) -> None:
        result = self.runner.model_generate(prompts, ignore_eos=True, max_new_tokens=new_tokens,
                                            sampling=SamplingParams())
        self.timing = result.timing


def timed(contender: Contender, prompts: list[str], new_tokens: int, synchronize: Callable[[], None]) -> float:
    synchronize()
    started = time.perf_counter()
    contender.generate(prompts, new_tokens)
    synchronize()
    return time.perf_counter() - started


def run_speed(report: Report, size: str, modes: list[str], batches: list[int], new_tokens: int, rounds: int,
              device: str, scratch: Path, profile: bool, model_attention_mode: str | None,
              before_timing: Callable[[], None] = lambda: None) -> None:
    backend = BACKENDS[device]()
    bandwidth = read_bandwidth_gb_s(2.0 if device == "cuda" else 0.25, repeats=22, device=device)
    checkpoint = build_speed_checkpoint(size, scratch / f"llama-{size}", device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    hf_model.generation_config.eos_token_id = None
    config = hf_model.config
    weight_bytes = sum(param.numel() * param.element_size() for param in hf_model.parameters())
    if not config.tie_word_embeddings:  # a decode step reads one row per token of an untied embedding table
        weight_bytes -= hf_model.get_input_embeddings().weight.nbytes
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    report.speed_meta = {
        "model": f"llama-shaped {size}", "parameters": sum(param.numel() for param in hf_model.parameters()),
        "weight_bytes_read_per_step": weight_bytes, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
        "rounds": rounds, "read_gb_per_s": round(bandwidth, 1),
    }
    progress(f"speed: {report.speed_meta['parameters'] / 1e6:,.0f}M parameters, read bandwidth {bandwidth:.0f} GB/s")
    contenders: list[Contender] = [HfContender("HF eager", hf_model, tokenizer, None),
                                   HfContender("HF static+compile", hf_model, tokenizer, "static")]
    ports = [(mode, False) for mode in modes] + ([(model_attention_mode, True)] if model_attention_mode else [])
    for mode, model_attention in ports:
        try:
            contenders.append(PortContender(checkpoint, mode, device, max(batches), new_tokens, model_attention))
        except Exception as error:  # noqa: BLE001
            report.speed.append({"batch": 0, "contender": f"port {mode}", "error": _error_line(error)})
    prompts = speed_prompts(tokenizer, max(batches))
    for batch in batches:
        # Batches in turn, not interleaved: HF's static cache is rebuilt (and its graphs recorded) for a new batch.
        live, results = [], {}
        for contender in contenders:
            started = time.perf_counter()
            try:
                for _ in range(2):
                    contender.generate(prompts[:batch], new_tokens)
                    contender.generate(prompts[:batch], 1)
                live.append(contender)
                results[contender.name] = {"T_N": [], "T_1": [], "warm_up_s": time.perf_counter() - started}
            except Exception as error:  # noqa: BLE001
                report.speed.append({"batch": batch, "contender": contender.name, "error": _error_line(error)})
            progress(f"speed batch {batch:<3} {contender.name:<18} warmed up in {time.perf_counter() - started:.1f} s")
        before_timing()
        for _ in range(rounds):
            for contender in live:
                results[contender.name]["T_1"].append(timed(contender, prompts[:batch], 1, backend.synchronize))
                results[contender.name]["T_N"].append(timed(contender, prompts[:batch], new_tokens,
                                                            backend.synchronize))
        context = PROMPT_TOKENS + new_tokens / 2
        roofline = batch / ((weight_bytes + batch * context * kv_bytes_per_token) / (bandwidth * 1e9))
        rows = {}
        for contender in live:
            times = results[contender.name]
            t_1, t_n = statistics.median(times["T_1"]), statistics.median(times["T_N"])
            if t_n <= t_1:
                report.speed.append({"batch": batch, "contender": contender.name,
                                     "error": f"{new_tokens} tokens took no longer than 1 ({t_n:.4f} s, {t_1:.4f} s): "
                                              f"timing noise; raise --new-tokens or --rounds"})
                continue
            tokens_per_s = batch * (new_tokens - 1) / (t_n - t_1)
            rows[contender.name] = {
                "batch": batch, "contender": contender.name, "prefill_ms": round(t_1 * 1000, 2),
                "decode_tokens_per_s": round(tokens_per_s, 1), "roofline_tokens_per_s": round(roofline, 1),
                "roofline_fraction": round(tokens_per_s / roofline, 3),
                "warm_up_s": round(times["warm_up_s"], 1), "T_1_s": times["T_1"], "T_N_s": times["T_N"],
            }
            if isinstance(contender, PortContender):  # the runner's own step timing of its last run
                rows[contender.name]["runner_decode_ms_p50"] = contender.timing["decode_ms_p50"]
        for row in rows.values():
            for baseline, key in (("HF eager", "vs_hf_eager"), ("HF static+compile", "vs_hf_static_compile")):
                if baseline in rows:
                    row[key] = round(row["decode_tokens_per_s"] / rows[baseline]["decode_tokens_per_s"], 2)
            report.speed.append(row)
            progress(f"speed batch {batch:<3} {row['contender']:<18} prefill {row['prefill_ms']:8.1f} ms, decode "
                     f"{row['decode_tokens_per_s']:9.1f} tokens/s ({row['roofline_fraction']:.0%} of roofline)")
        report.save()
        ports = [contender for contender in live if isinstance(contender, PortContender)]
        if profile and ports:
            fastest = max(ports, key=lambda port: rows[port.name]["decode_tokens_per_s"])
            profile_run(fastest, prompts[:batch], new_tokens, device,
                        report.folder / f"profile_{re.sub('[^A-Za-z0-9]+', '_', fastest.name).strip('_')}_batch{batch}.txt")
    report.speed_meta.update(compile_counters())
    report.save()


def profile_run(contender: Contender, prompts: list[str], new_tokens: int, device: str, path: Path) -> None:
    """Where one generation's time goes: torch.profiler's table of the ops and kernels, by total time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        contender.generate(prompts, new_tokens)
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    _write(path, profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70) + "\n"
           + profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


# ---------------------------------------------------------------------------------------------------- overlap
@dataclass
class VerifyWorker:
    model: str
    out: Path
    process: subprocess.Popen


def start_verify_workers(args: argparse.Namespace, modes: list[str], scratch: Path) -> list[VerifyWorker]:
    """The verify part as one process per model, started now: compiling is mostly single-threaded host work, and
    a device session is minutes."""
    workers = []
    for model in args.models:
        out = scratch / f"verify_{model}"
        command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--parts", "verify",
                   "--models", model, "--modes", *modes, "--dtypes", *args.dtypes, "--out", str(out)]
        workers.append(VerifyWorker(model, out, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                                 stderr=subprocess.STDOUT, text=True)))
    return workers


def collect_verify_workers(workers: list[VerifyWorker], report: Report) -> None:
    """Wait for the workers (once), take their cases into `report` and their logs beside it."""
    started = time.perf_counter()
    while workers:
        worker = workers.pop(0)
        output, _ = worker.process.communicate()
        for line in output.splitlines():
            if line.startswith("verify "):
                progress(line)
        result = worker.out / "device_check.json"
        if result.exists():
            report.verify.extend(json.loads(result.read_text())["verify"])
        else:
            report.verify.append({"model": worker.model, "mode": "all", "dtype": "all", "passed": False,
                                  "error": f"the verify worker exited {worker.process.returncode}: "
                                           f"{output.strip().splitlines()[-1] if output.strip() else 'no output'}"})
        log = worker.out / "device_check.log"
        with open(report.folder / "verify_workers.log", "a") as merged:
            merged.write(f"===== {worker.model}\n{log.read_text() if log.exists() else output}")
        report.save()
    if time.perf_counter() - started > 1:
        progress(f"waited {time.perf_counter() - started:.1f} s for the verify workers before timing")


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parts", nargs="+", choices=["verify", "speed"], default=["verify", "speed"])
    parser.add_argument("--models", nargs="+", choices=sorted(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--modes", nargs="+", help="exe modes (default: every mode of the device)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--speed-model", choices=sorted(SPEED_MODELS), default="1b")
    parser.add_argument("--speed-modes", nargs="+", help="the port's modes in the speed part (default: --modes)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-attention-mode", metavar="MODE",
                        help="also run the port in MODE with the model's own attention in decode steps")
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="verify in one process per model while the speed part compiles, timing nothing until "
                             "they are done (default: on for cuda, where a device session is short)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one run of the fastest port mode per batch (profile_*.txt beside the report)")
    parser.add_argument("--out", type=Path, default=Path("results/device_check"))
    args = parser.parse_args(argv)
    backend_class = BACKENDS[args.device]
    if not backend_class.is_available():
        parser.error(f"--device {args.device}: no {args.device} device is available here; use --device cpu")
    modes = args.modes or list(backend_class.exe_modes)
    asked = modes + (args.speed_modes or []) + ([args.model_attention_mode] if args.model_attention_mode else [])
    unknown = [mode for mode in asked if mode not in backend_class.exe_modes]
    if unknown:
        parser.error(f"mode {unknown[0]} does not run on {args.device}; its modes: {', '.join(backend_class.exe_modes)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: decode speed needs at least 2 new tokens")

    args.out.mkdir(parents=True, exist_ok=True)
    libraries_log_to(args.out / "device_check.log")
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{cpu_model()} ({os.cpu_count()} cores)")
    report = Report(args.out, {
        "device": args.device, "device_name": device_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "command": " ".join(["python bench/device_check.py", *sys.argv[1:]]),
    })
    progress(f"device_check on {device_name}: torch {torch.__version__}, transformers {transformers.__version__}")
    overlap = args.device == "cuda" if args.overlap is None else args.overlap
    with tempfile.TemporaryDirectory() as scratch:
        before_timing: Callable[[], None] = lambda: None
        if "verify" in args.parts and "speed" in args.parts and overlap:
            workers = start_verify_workers(args, modes, Path(scratch))
            before_timing = lambda: collect_verify_workers(workers, report)  # noqa: E731
        elif "verify" in args.parts:
            run_verify(report, args.models, modes, args.dtypes, args.device, Path(scratch))
        if "speed" in args.parts:
            run_speed(report, args.speed_model, args.speed_modes or modes, args.batches, args.new_tokens,
                      args.rounds, args.device, Path(scratch), args.profile, args.model_attention_mode, before_timing)
        before_timing()
    report.save()
    failed = [row for row in report.verify if not row["passed"]] + [row for row in report.speed if "error" in row]
    progress(f"wrote {args.out / 'device_check.json'} and device_check.md: {len(report.verify)} verify cases, "
             f"{len(failed)} failed or broke")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
