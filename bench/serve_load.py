"""Serving SmolLM2-135M-Instruct under load: continuous batching against one request at a time.

    python bench/serve_load.py [--requests 64] [--clients 16] [--new-tokens 64] [--batch-size 16]
                               [--dtype float32] [--json results/bench_serve_load.json]

Sends the same `--requests` streamed chat requests to `python -m generated_models.llama.serve` on the imported
SmolLM2 checkpoint twice: from `--clients` concurrent clients to a server of `--batch-size` rows, and from one
client, one request after another, to a server of one row (one at a time at its best: a wider server would
decode its idle rows too). Every request asks for exactly `--new-tokens` tokens (`ignore_eos`, vLLM's extension).
Reports errors, lost requests (no `[DONE]`), output tokens/s, latency and time to first token (p50 / p99) for
each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import yaml

from core.gguf_import import import_gguf, packaged_smollm2_gguf
from machine import cpu_model

CHECKPOINT = Path("build/checkpoints/SmolLM2-135M-Instruct")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a language model is.",
             "Name three primary colours.", "How do tensor-parallel layers split a weight?",
             "Give me a recipe for pancakes.", "What is 17 times 23?", "Summarise the plot of Hamlet."]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def one_request(url: str, index: int, new_tokens: int, record: list) -> None:
    body = {"model": "llama", "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started, first, tokens, done, error = time.perf_counter(), None, 0, False, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as failure:
        error = repr(failure)
    ended = time.perf_counter()
    record.append({"latency_s": ended - started, "ttft_s": (first or ended) - started, "tokens": tokens,
                   "done": done, "error": error, "started": started, "ended": ended})


def load(url: str, requests: int, clients: int, new_tokens: int) -> dict:
    record: list = []
    pending = list(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop(0)
            one_request(url, index, new_tokens, record)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies, ttfts = [r["latency_s"] for r in record], [r["ttft_s"] for r in record]
    return {
        "clients": clients, "requests": requests, "errors": sum(r["error"] is not None for r in record),
        "lost": sum(not r["done"] for r in record), "output_tokens": sum(r["tokens"] for r in record),
        "seconds": round(elapsed, 2), "output_tokens_per_s": round(sum(r["tokens"] for r in record) / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p99_s": round(percentile(ttfts, 0.99), 3),
    }


def run_against_server(checkpoint: Path, args: argparse.Namespace, rows: int, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "serve.yaml"
        config.write_text(yaml.safe_dump({
            "model_name": "llama", "model_path": str(checkpoint),
            "model_config": {"dtype": args.dtype, "device": "cpu"},
            "data_config": {"batch_size": rows, "input_max_len": 64, "max_new_tokens": args.new_tokens},
        }))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log_path = Path(scratch) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "generated_models.llama.serve", "--config", str(config),
                                       "--port", str(port), "--max-waiting", str(args.requests)],
                                      stdout=log, stderr=subprocess.STDOUT)
            try:
                while True:
                    if server.poll() is not None:
                        raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
                    try:
                        if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.5)
                one_request(url, 0, 4, [])  # first-request costs (allocation) out of the figures
                return {"rows": rows, **load(url, args.requests, clients, args.new_tokens)}
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    checkpoint, _ = import_gguf(packaged_smollm2_gguf(), CHECKPOINT)
    batched = run_against_server(checkpoint, args, args.batch_size, args.clients)
    sequential = run_against_server(checkpoint, args, 1, 1)
    result = {
        "cpu": cpu_model(), "threads": __import__("torch").get_num_threads(), "dtype": args.dtype,
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "continuous_batching": batched,
        "one_at_a_time": sequential,
        "speedup": round(batched["output_tokens_per_s"] / sequential["output_tokens_per_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
