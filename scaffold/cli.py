"""`recipes-scaffold MODEL [MODEL ...] [--from SOURCE] [--out ROOT] [--force | --upgrade]`, and subcommands."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.cli import exit_on_user_error
from scaffold.errors import ScaffoldError
from scaffold.pipeline import generate
from scaffold.quantized_formats import QUANTIZATIONS


def _scaffold_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipes-scaffold",
        description="Write a runner_settings-aware port of a Hugging Face causal LM onto the core ModelRunner.",
        epilog="Also: `recipes-scaffold split-weights --config YAML --out DIR` (per-rank shards for offline split) "
        "`recipes-scaffold import-gguf FILE --out DIR` (a GGUF checkpoint as HF safetensors) "
        "and `recipes-scaffold tiny-checkpoint MODEL_TYPE --out DIR [--quant mxfp4|fp8]` (a tiny random checkpoint "
        "to try a port).",
    )
    parser.add_argument("models", nargs="+", metavar="model",
                        help="model name as in transformers/models/, e.g. gpt_oss; several regenerate several ports "
                             "in one run (`--upgrade` after a transformers release)")
    parser.add_argument("--from", dest="source", default="transformers",
                        help="'transformers' (the installed release) or a folder holding config.json, "
                             "configuration_*.py and modeling_*.py (parsed, never imported)")
    parser.add_argument("--out", type=Path, default=Path("."), help="root folder to write into (default: .)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="overwrite generated files even if you edited them")
    mode.add_argument("--upgrade", action="store_true",
                      help="regenerate and three-way merge your edits into the new output (conflicts get markers)")
    return parser


def _tiny_checkpoint_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recipes-scaffold tiny-checkpoint",
        description="Save a tiny randomly initialised HF checkpoint (with tokenizer) of an architecture.",
    )
    parser.add_argument("model_type", help="config model_type, e.g. gpt_oss")
    parser.add_argument("--out", type=Path, required=True, help="folder to save the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quant", choices=QUANTIZATIONS,
                        help="store the weights as a Hub checkpoint of this format does (mxfp4: gpt-oss experts; "
                             "fp8: block-wise, every linear but the LM head)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "split-weights":
        from core.split import main as split_main

        return split_main(argv[1:])
    if argv and argv[0] == "import-gguf":
        from core.gguf_import import main as import_gguf_main

        return import_gguf_main(argv[1:])
    if argv and argv[0] == "sweep":
        from scaffold.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "tiny-checkpoint":
        args = _tiny_checkpoint_parser().parse_args(argv[1:])
        from scaffold.tiny import build_tiny_checkpoint
        from scaffold.tiny_quantized import build_tiny_quantized_checkpoint

        if args.quant:
            path = build_tiny_quantized_checkpoint(args.model_type, args.out, args.quant, seed=args.seed)
        else:
            path = build_tiny_checkpoint(args.model_type, args.out, seed=args.seed)
        stored = f" ({args.quant})" if args.quant else ""
        print(f"tiny {args.model_type} checkpoint{stored} written to {path}")
        return 0
    args = _scaffold_parser().parse_args(argv)
    if len(args.models) > 1 and args.source != "transformers":
        raise ScaffoldError(f"--from {args.source} holds one model; give one name, not {len(args.models)}")
    conflicted = []
    for model in args.models:
        started = time.perf_counter()
        report = generate(model, args.source, args.out, force=args.force, upgrade=args.upgrade).report
        for path in report.written:
            print(f"wrote {path}")
        for path in report.merged:
            print(f"merged your edits into {path}")
        print(f"{model}: {len(report.written)} files written in {time.perf_counter() - started:.2f} s")
        conflicted += report.conflicted
    if conflicted:
        print(f"conflicts to resolve (marked <<<<<<< / >>>>>>>): {', '.join(map(str, conflicted))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
