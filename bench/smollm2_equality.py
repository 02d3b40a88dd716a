"""The llama port against HF eager on the real SmolLM2-135M-Instruct weights: 64 greedy tokens on 4 prompts.

    python bench/smollm2_equality.py [--new-tokens 64] [--batched]

Each prompt runs alone (batch 1) unless --batched puts all four in one left-padded batch. Prints each run's
verification summary (teacher-forced logit difference, greedy token mismatches) and exits 1 if any token
differs. tests/test_real_model.py checks the first prompt in the test command.
"""

from __future__ import annotations

import argparse

import torch

from core.gguf_import import import_gguf, packaged_smollm2_gguf
from generated_models.llama.runner_llama import LlamaRunner
from scaffold.verify import verify_port

CHECKPOINT = "build/checkpoints/SmolLM2-135M-Instruct"
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "The three primary colours are",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batched", action="store_true", help="all prompts in one left-padded batch")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    checkpoint, _ = import_gguf(packaged_smollm2_gguf(), CHECKPOINT)
    batches = [list(PROMPTS)] if args.batched else [[prompt] for prompt in PROMPTS]
    differing = 0
    for prompts in batches:
        report = verify_port(LlamaRunner, checkpoint, prompts=prompts, max_new_tokens=args.new_tokens, tolerance=1e-3)
        print(f"{prompts}: {report.summary()}", flush=True)
        differing += len(report.mismatches)
    print("greedy tokens equal HF eager's on every prompt" if differing == 0
          else f"{differing} rows differ from HF eager")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
