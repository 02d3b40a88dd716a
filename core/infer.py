"""The command line every port's infer.py runs: prompts or a dataset in, generations and timing out (rank 0
prints; with --output-jsonl each finished batch is appended there and a rerun resumes)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from core.batch_run import run_records, written_ids
from core.cli import exit_on_user_error
from core.dataset import DEFAULT_DATASET, Record, default_records, load_records
from core.model_runner import GenerationResult, ModelRunner
from core.settings import load_runner_settings

# --flag → sampling_config key (transformers' GenerationConfig names)
SAMPLING_FLAGS = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float, "seed": int,
}


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="runner_settings YAML file")
    parser.add_argument("--model-path", help="checkpoint folder; overrides model_path in the YAML")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several; run in batches of "
                                                          "data_config.batch_size); overrides data_config.dataset")
    parser.add_argument("--output-json", type=Path, help="write prompts, outputs, token ids and timing here")
    parser.add_argument("--output-jsonl", type=Path,
                        help="append one JSON line per finished record; a rerun skips the ids already there")
    parser.add_argument("--stream", action="store_true",
                        help="print the answer as it is generated (a batch: each row's text when it finishes)")
    sampling = parser.add_argument_group("sampling (sampling_config; unset: the checkpoint's generation_config)")
    mode = sampling.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, help="sample")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="always the argmax")
    for key, kind in SAMPLING_FLAGS.items():
        sampling.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind)
    sampling.add_argument("--stop", dest="stop_strings", action="append", help="stop string (repeatable)")
    sampling.add_argument("--eos-token-id", dest="eos_token_id", type=int, action="append",
                          help="extra stop token id (repeatable)")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {"model_path": args.model_path} if args.model_path else {}
    for key in ("do_sample", *SAMPLING_FLAGS, "stop_strings", "eos_token_id"):
        if getattr(args, key) is not None:
            overrides[f"sampling_config.{key}"] = getattr(args, key)
    return overrides


def _records(args: argparse.Namespace, settings: dict, model_name: str) -> list[Record]:
    """What to generate for, every record checked before the model loads."""
    if args.prompt:
        return [Record(str(index), prompt) for index, prompt in enumerate(args.prompt)]
    dataset = settings["data_config"]["dataset"]
    if dataset == DEFAULT_DATASET:
        return default_records(model_name, settings["data_config"]["batch_size"])
    return load_records(dataset)


def _print_batch(records: list[Record], result: GenerationResult, exe_mode: str, streamed: bool) -> None:
    if not streamed:
        for record, output in zip(records, result.outputs):
            print(f"prompt: {record.prompt!r}\noutput: {output!r}\n")
    timing = result.timing
    print(
        f"timing ({exe_mode}): prefill {timing['prefill_ms']:.1f} ms, decode {timing['decode_ms_mean']:.2f} "
        f"ms/step (p50 {timing['decode_ms_p50']:.2f}, p90 {timing['decode_ms_p90']:.2f}), "
        f"{timing['decode_tokens_per_s']:.1f} tokens/s, compile {timing['compile_s']:.1f} s, "
        f"recompiles after warm-up {timing['recompiles_after_warmup']}"
    )


@exit_on_user_error
def main(runner_class: type[ModelRunner], argv: list[str] | None = None, *, model_name: str,
         description: str | None = None) -> None:
    """Run `runner_class` on the prompts of the command line `argv` (sys.argv when None).

    model_name: the port's name, which the default prompts ask about. description: the --help text.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, description)
    runner_settings = load_runner_settings(args.config, _overrides(args))
    records = _records(args, runner_settings, model_name)
    dataset_run = args.output_jsonl is not None
    record_ids = {record.id for record in records}
    already = len(written_ids(args.output_jsonl, repair=False) & record_ids) if dataset_run else 0

    runner = runner_class(runner_settings)
    rank0 = runner.global_rank == 0
    if not rank0 or dataset_run:
        logging.getLogger().setLevel(logging.WARNING)
    runner.init_model()

    def report(batch: list[Record], result: GenerationResult) -> None:
        if rank0 and not dataset_run:
            _print_batch(batch, result, runner.exe_mode, args.stream)

    # Graph modes compile while warming up; the measured run then recompiles nothing.
    results = run_records(
        runner, records, runner_settings["data_config"]["batch_size"],
        output_jsonl=args.output_jsonl, write_output=rank0, warm_up=runner.exe_mode != "eager",
        stream=args.stream and rank0, show_progress=rank0 and dataset_run, on_batch=report,
    )
    if not rank0:
        return
    if dataset_run:
        print(f"{len(records) - already} records generated, {already} were already in {args.output_jsonl}")
    if args.output_json and results:
        report_json = {
            "prompts": [prompt for result in results for prompt in result.prompts],
            "outputs": [output for result in results for output in result.outputs],
            "output_token_ids": [ids for result in results for ids in result.output_token_ids],
            "timing": results[0].timing,
        }
        if len(results) > 1:
            report_json["timing_per_batch"] = [result.timing for result in results]
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report_json, indent=2, ensure_ascii=False) + "\n")
