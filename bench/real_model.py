"""SmolLM2-135M-Instruct decode and prefill speed: HF against the llama port, on one checkpoint, in one process.

    python bench/real_model.py [--batches 1 8] [--dtypes float32 bfloat16] [--new-tokens 32] [--repeats 3]
                               [--json results/bench_real_model.json]

Contenders, per dtype and batch size: (a) HF eager `generate`; (b) HF `generate` with a static cache, which
then compiles its decode forward with torch.compile (HF's CompileConfig defaults); (c) the port in `eager`; (d) the
port in `inductor` (float weights on our AVX-512 kernel where the CPU has it, `core/backends/float_rows.py`); (d')
the port in `inductor` with `compile_autotune: true` (weights frozen into the graph, inductor's max-autotuned GEMM
template). With bfloat16 also the port's low-bit linears in `inductor` (torch's CPU kernels, bfloat16
activations): (e) the GGUF's own Q4_1 / Q8_0 codes kept (`import-gguf --keep-quantized`, `quant_weight_mode:
packed`); (f) `weight_quant: int4` and (g) `int8`, quantized at load from the float import; and (h) llama.cpp on
the same GGUF file with the same threads (`pip install llama-cpp-python==0.3.36`, built from source; skipped with a
note when absent). Each warms up once (compiling
what it compiles), then they run in turn, `--repeats` rounds, so drift hits all alike; a figure is the median
over rounds. The machine's memory read bandwidth is measured between every two contenders' runs, since on a shared
host it moves (between ~31 and ~65 GB/s within minutes on a 2-core AMD EPYC VM): a run's decode roofline is the mean
of the bandwidths read just before and just after it, over the bytes of weights one decode step reads (every
parameter once; an untied input embedding only gathers rows, so it is left out), and each decode figure is also
given as the median over rounds of its fraction of that roofline.

With batch 1 and a larger batch both asked for, the low-bit ports' batch scaling (larger batch's tokens/s over batch
1's) is measured once more in paired rounds, each port's two batch sizes back to back: the tables above measure one
batch size after the other, minutes apart, and a host's drift between them moves their ratio by 10-20%.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from gguf import GGUFReader
from library_logs import libraries_log_to
from machine import BandwidthProbe, cpu_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CompileConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from core.backends.float_rows import FloatRowsWeight
from core.gguf_import import import_gguf, packaged_smollm2_gguf
from core.quantization import PackedWeight
from core.quantization.low_bit import int_groups_kernel_for
from generated_models.llama.runner_llama import LlamaRunner

CHECKPOINT = Path("build/checkpoints/SmolLM2-135M-Instruct")
LLAMA_CPP = "llama.cpp (same GGUF)"
KEPT_CHECKPOINT = Path("build/checkpoints/SmolLM2-135M-Instruct-q4_1")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a language model is, in two sentences.",
    "List three primary colours.",
    "def fibonacci(n):",
    "Translate 'good morning' into German.",
    "Why is the sky blue?",
    "Give me a synonym for 'happy'.",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding is head
    total = sum(param.numel() * param.element_size() for param in model.parameters())
    total += sum(module.packed_bytes() for module in model.modules() if isinstance(module, PackedWeight))
    total += sum(module.laid_out.numel() * module.laid_out.element_size()
                 for module in model.modules() if isinstance(module, FloatRowsWeight))
    return total if tied else total - embedding.numel() * embedding.element_size()


class _StepClock(LogitsProcessor):
    """Called once per generated token, right after the forward: the gaps between calls are the steps."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class HfContender:
    def __init__(self, dtype: torch.dtype, compiled: bool, new_tokens: int):
        self.tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=dtype).eval()
        self.config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id)
        if compiled:
            # HF's own route: a static cache makes generate() compile the decode forward; on CPU it must be told
            # to (compile_config's _compile_all_devices), otherwise it compiles only on accelerators.
            self.config.cache_implementation = "static"
            self.config.compile_config = CompileConfig()
            self.config.compile_config._compile_all_devices = True

    def run(self, prompts: list[str]) -> dict[str, float]:
        batch = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        clock = _StepClock()
        started = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(**batch, generation_config=self.config, logits_processor=LogitsProcessorList([clock]))
        steps = [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:])]
        return {"prefill_ms": (clock.stamps[0] - started) * 1000, "decode_ms": statistics.median(steps) * 1000}


class PortContender:
    def __init__(self, dtype: str, exe_mode: str, batch_size: int, new_tokens: int, checkpoint: Path = CHECKPOINT,
                 **model_config):
        self.runner = LlamaRunner({
            "model_name": "llama", "model_path": str(checkpoint), "exe_mode": exe_mode,
            "model_config": {"dtype": dtype, "device": "cpu", **model_config},
            "data_config": {"input_max_len": 32, "max_new_tokens": new_tokens, "batch_size": batch_size},
        })
        self.runner.init_model()
        self.model = self.runner.model
        self.weight_bytes = weight_bytes_per_step(self.model)

    def run(self, prompts: list[str]) -> dict[str, float]:
        timing = self.runner.model_generate(prompts, ignore_eos=True).timing
        return {"prefill_ms": timing["prefill_ms"], "decode_ms": timing["decode_ms_p50"]}


class LlamaCppContender:
    """llama.cpp through llama-cpp-python on the GGUF file itself, greedy; a step is the gap between two tokens."""

    def __init__(self, new_tokens: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(packaged_smollm2_gguf()), n_threads=torch.get_num_threads(),
                         n_threads_batch=torch.get_num_threads(), n_ctx=256, verbose=False)
        self.new_tokens = new_tokens
        self.weight_bytes = sum(int(tensor.n_bytes) for tensor in GGUFReader(packaged_smollm2_gguf()).tensors)

    def run(self, prompts: list[str]) -> dict[str, float]:
        self.llm.reset()
        tokens = self.llm.tokenize(prompts[0].encode())
        started = time.perf_counter()
        stamps = []
        for _ in self.llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == self.new_tokens:
                break
        steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        return {"prefill_ms": (stamps[0] - started) * 1000, "decode_ms": statistics.median(steps) * 1000}


def llama_cpp_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp row skipped: llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
    return None


def contenders(dtype: str, batch_size: int, new_tokens: int) -> dict:
    built = {
        "HF eager generate": lambda: HfContender(DTYPES[dtype], False, new_tokens),
        "HF static cache + compile": lambda: HfContender(DTYPES[dtype], True, new_tokens),
        "port eager": lambda: PortContender(dtype, "eager", batch_size, new_tokens),
        "port inductor": lambda: PortContender(dtype, "inductor", batch_size, new_tokens),
        "port inductor, frozen": lambda: PortContender(dtype, "inductor", batch_size, new_tokens,
                                                       compile_autotune=True),
    }
    if dtype == "bfloat16":
        built["port GGUF Q4_1 kept"] = lambda: PortContender(dtype, "inductor", batch_size, new_tokens,
                                                             KEPT_CHECKPOINT, quant_weight_mode="packed")
        built["port int4 (weight_quant)"] = lambda: PortContender(dtype, "inductor", batch_size, new_tokens,
                                                                  weight_quant="int4")
        built["port int8 (weight_quant)"] = lambda: PortContender(dtype, "inductor", batch_size, new_tokens,
                                                                  weight_quant="int8")
        if batch_size == 1 and llama_cpp_missing() is None:
            built[LLAMA_CPP] = lambda: LlamaCppContender(new_tokens)
    return built


def progress(message: str) -> None:
    """The benchmark's one progress line on the terminal, rewritten in place."""
    print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def measure(dtype: str, batch_size: int, new_tokens: int, repeats: int) -> list[dict]:
    prompts = PROMPTS[:batch_size]
    built, compile_s = {}, {}
    for name, build in contenders(dtype, batch_size, new_tokens).items():
        progress(f"{dtype} batch {batch_size}: warming up {name}")
        started = time.perf_counter()
        built[name] = build()
        built[name].run(prompts)
        compile_s[name] = time.perf_counter() - started
    rounds, probe = [], BandwidthProbe()
    bandwidth = probe.read_gb_s()
    for index in range(repeats):
        progress(f"{dtype} batch {batch_size}: round {index + 1} of {repeats}")
        round_ = {}
        for name, contender in built.items():
            before = bandwidth
            round_[name] = contender.run(prompts)
            bandwidth = probe.read_gb_s()
            round_[name]["read_bandwidth_gb_s"] = (before + bandwidth) / 2
        rounds.append(round_)
    float_bytes = weight_bytes_per_step(next(iter(built.values())).model)
    rows = []
    for name, contender in built.items():
        weight_bytes = getattr(contender, "weight_bytes", float_bytes)
        decode_ms = statistics.median(round_[name]["decode_ms"] for round_ in rounds)
        bandwidths = [round_[name]["read_bandwidth_gb_s"] for round_ in rounds]
        roofline_ms = [weight_bytes / (bandwidth * 1e9) * 1000 for bandwidth in bandwidths]
        rows.append({
            "dtype": dtype, "batch": batch_size, "contender": name,
            "prefill_ms": round(statistics.median(round_[name]["prefill_ms"] for round_ in rounds), 1),
            "decode_ms": round(decode_ms, 2),
            "decode_tokens_per_s": round(batch_size * 1000 / decode_ms, 1),
            "vs_hf_eager": round(statistics.median(
                round_["HF eager generate"]["decode_ms"] / round_[name]["decode_ms"] for round_ in rounds), 2),
            "vs_hf_compiled": round(statistics.median(
                round_["HF static cache + compile"]["decode_ms"] / round_[name]["decode_ms"] for round_ in rounds), 2),
            "vs_llama_cpp": round(statistics.median(
                round_[LLAMA_CPP]["decode_ms"] / round_[name]["decode_ms"] for round_ in rounds), 2)
            if LLAMA_CPP in built else None,
            "roofline_fraction": round(statistics.median(
                roofline / round_[name]["decode_ms"] for roofline, round_ in zip(roofline_ms, rounds)), 3),
            "read_bandwidth_gb_s": round(statistics.median(bandwidths), 1),
            "weight_bytes_per_step": weight_bytes,
            "warm_up_s": round(compile_s[name], 1),
        })
    del built
    return rows


LOW_BIT_PORTS = ("port GGUF Q4_1 kept", "port int4 (weight_quant)", "port int8 (weight_quant)")


def measure_batch_scaling(batch_size: int, new_tokens: int, repeats: int) -> list[dict]:
    """Each low-bit port at batch 1 and `batch_size`, run back to back in every round; the median per-round ratio
    of their tokens/s."""
    built = {}
    for batch in (1, batch_size):
        ports = contenders("bfloat16", batch, new_tokens)
        for name in LOW_BIT_PORTS:
            progress(f"batch scaling: warming up {name} at batch {batch}")
            built[name, batch] = ports[name]()
            built[name, batch].run(PROMPTS[:batch])
    steps = {key: [] for key in built}
    for index in range(repeats):
        progress(f"batch scaling: round {index + 1} of {repeats}")
        for name in LOW_BIT_PORTS:
            for batch in (1, batch_size):
                steps[name, batch].append(built[name, batch].run(PROMPTS[:batch])["decode_ms"])
    del built
    return [{
        "contender": name, "batch": batch_size,
        "batch_1_tokens_per_s": round(1000 / statistics.median(steps[name, 1]), 1),
        "batch_tokens_per_s": round(batch_size * 1000 / statistics.median(steps[name, batch_size]), 1),
        "scaling": round(statistics.median(
            batch_size * one / many for one, many in zip(steps[name, 1], steps[name, batch_size])), 2),
    } for name in LOW_BIT_PORTS]


def print_scaling(rows: list[dict]) -> None:
    print(f"batch scaling of the low-bit ports, bfloat16, paired rounds (batch {rows[0]['batch']} tok/s over batch 1)")
    for row in rows:
        print(f"  {row['contender']:<26} batch 1 {row['batch_1_tokens_per_s']:>7.1f} tok/s, batch {row['batch']} "
              f"{row['batch_tokens_per_s']:>7.1f} tok/s: {row['scaling']:.2f}x")


def print_table(rows: list[dict]) -> None:
    bandwidths = [row["read_bandwidth_gb_s"] for row in rows]
    print(f"SmolLM2-135M-Instruct, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"read bandwidth {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s (median per row, measured "
          f"around each run); integer-group kernel: {int_groups_kernel_for(32)}")
    header = (f"{'dtype':<9} {'batch':>5} {'contender':<26} {'prefill ms':>10} {'decode ms':>9} {'tok/s':>7} "
              f"{'vs HF eager':>11} {'vs HF compiled':>14} {'vs llama.cpp':>12} {'roofline':>8} {'warm-up s':>9}")
    print(header)
    for row in rows:
        versus_llama_cpp = "—" if row["vs_llama_cpp"] is None else f"{row['vs_llama_cpp']:.2f}x"
        print(f"{row['dtype']:<9} {row['batch']:>5} {row['contender']:<26} {row['prefill_ms']:>10.1f} "
              f"{row['decode_ms']:>9.2f} {row['decode_tokens_per_s']:>7.1f} {row['vs_hf_eager']:>10.2f}x "
              f"{row['vs_hf_compiled']:>13.2f}x {versus_llama_cpp:>12} {row['roofline_fraction']:>8.0%} "
              f"{row['warm_up_s']:>9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("results/bench_real_model.json"))
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.json.with_suffix(".log")
    libraries_log_to(log_path)
    torch.set_grad_enabled(False)
    import_gguf(packaged_smollm2_gguf(), CHECKPOINT)
    if "bfloat16" in args.dtypes:
        import_gguf(packaged_smollm2_gguf(), KEPT_CHECKPOINT, keep_quantized=True)
        if llama_cpp_missing():
            print(llama_cpp_missing())
    rows = [row for dtype in args.dtypes for batch in args.batches
            for row in measure(dtype, batch, args.new_tokens, args.repeats)]
    scaling = []
    if "bfloat16" in args.dtypes and 1 in args.batches and max(args.batches) > 1:
        scaling = measure_batch_scaling(max(args.batches), args.new_tokens, args.repeats)
    progress("")
    print_table(rows)
    if scaling:
        print_scaling(scaling)
    args.json.write_text(json.dumps({"cpu": cpu_model(), "int_groups_kernel": int_groups_kernel_for(32),
                                     "rows": rows, "batch_scaling": scaling}, indent=2) + "\n")
    print(f"wrote {args.json}; library logs in {log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
