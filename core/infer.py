"""The command line every port's infer.py runs: prompts in, generations and timing out (printed by rank 0)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from core.cli import exit_on_user_error
from core.model_runner import ModelRunner
from core.settings import load_runner_settings


def default_prompts(model_name: str, batch_size: int) -> list[str]:
    """One prompt per batch row, cycling through three."""
    prompts = [f"Explain what {model_name} is.", "Write a haiku about the sea.", "The three primary colours are"]
    return [prompts[index % len(prompts)] for index in range(batch_size)]


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="runner_settings YAML file")
    parser.add_argument("--model-path", help="checkpoint folder; overrides model_path in the YAML")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--output-json", type=Path, help="write prompts, outputs, token ids and timing here")
    return parser.parse_args(argv)


@exit_on_user_error
def main(runner_class: type[ModelRunner], argv: list[str] | None = None, *, model_name: str,
         description: str | None = None) -> None:
    """Run `runner_class` on the prompts of the command line `argv` (sys.argv when None).

    model_name: the port's name, which the default prompts ask about. description: the --help text.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, description)
    overrides = {"model_path": args.model_path} if args.model_path else {}
    runner_settings = load_runner_settings(args.config, overrides)
    prompts = args.prompt or default_prompts(model_name, runner_settings["data_config"]["batch_size"])

    runner = runner_class(runner_settings)
    if runner.global_rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    runner.init_model()
    # Graph modes compile while warming up; the measured run then recompiles nothing.
    result = runner.model_generate(prompts, warm_up=runner.exe_mode != "eager")

    if runner.global_rank != 0:
        return
    for prompt, output in zip(result.prompts, result.outputs):
        print(f"prompt: {prompt!r}\noutput: {output!r}\n")
    timing = result.timing
    print(
        f"timing ({runner.exe_mode}): prefill {timing['prefill_ms']:.1f} ms, decode {timing['decode_ms_mean']:.2f} "
        f"ms/step (p50 {timing['decode_ms_p50']:.2f}, p90 {timing['decode_ms_p90']:.2f}), "
        f"{timing['decode_tokens_per_s']:.1f} tokens/s, compile {timing['compile_s']:.1f} s, "
        f"recompiles after warm-up {timing['recompiles_after_warmup']}"
    )
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
