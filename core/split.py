"""Offline weight splitting: `model_path/rank_{i}/` holds rank i's shards (the seed's convention), so that
each rank later reads only its own files (`enable_online_split_weight: false`)."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.initialization import no_init_weights

from core.cli import exit_on_user_error
from core.distributed import simulated_rank
from core.errors import SettingsError
from core.layers import check_partitions
from core.model_runner import ModelRunner, read_hf_config
from core.quantization import QuantizedCheckpoint, declared_quantization, quantization_method
from core.quantization.base import join_pieces
from core.safetensors_reader import SafetensorsCheckpoint
from core.settings import load_runner_settings, validate_runner_settings
from core.weights import checkpoint_targets, load_checkpoint_into

WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
SPLIT_SETTINGS_FILE = "runner_settings.yaml"


def _copy_side_files(source: Path, destination: Path) -> None:
    """config, generation config, tokenizer files: everything at the top of the checkpoint but the weights."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not any(path.match(pattern) for pattern in WEIGHT_FILES):
            shutil.copy2(path, destination / path.name)


def _rank_model(runner_class: type[ModelRunner], config, settings: dict[str, Any], rank: int) -> torch.nn.Module:
    with simulated_rank(settings["parallel_config"], rank), no_init_weights():
        model = runner_class.model_class(config, settings)
    model.tie_weights()
    check_partitions(model)
    return model


def _rank_shards(model: torch.nn.Module, checkpoint, advance) -> dict[str, torch.Tensor]:
    """What a rank's file holds: its slices of the model's tensors and, of a quantized checkpoint's quantized
    tensors, its slices as stored (fp8 values and their scale grid, mxfp4 blocks and scales)."""
    if not isinstance(checkpoint, QuantizedCheckpoint):
        loaded = set(load_checkpoint_into(model, checkpoint, on_tensor_loaded=advance))
        return {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name in loaded}
    with checkpoint.reading("collect") as pieces:
        loaded = set(load_checkpoint_into(model, checkpoint, on_tensor_loaded=advance, keep_quantized=True))
    shards = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name in loaded}
    for logical, parts in pieces.items():
        stored = checkpoint.get_slice(logical).parts
        shards.update((stored[role].name, joined.contiguous()) for role, joined in join_pieces(parts).items())
    return shards


def split_checkpoint(runner_class: type[ModelRunner], runner_settings: dict[str, Any], out_dir: Path,
                     show_progress: bool = True) -> Path:
    """Write every rank's shards of `runner_settings['model_path']` under `out_dir`; return the settings YAML
    that runs them."""
    settings = validate_runner_settings(runner_settings)
    world_size = settings["world_size"]
    source = Path(settings["model_path"])
    config = read_hf_config(source, runner_class.config_class)
    out_dir = Path(out_dir)
    quant_config = declared_quantization(config)
    with SafetensorsCheckpoint(source) as checkpoint:
        dtype = checkpoint.dtype()
        if quant_config is not None:
            # The split keeps what the checkpoint stores: each rank's quantized slices, with their scales.
            method = quantization_method(quant_config, "dequantize", source / "config.json")
            checkpoint = QuantizedCheckpoint(checkpoint, method)
        # Rank 0's model shows any size TP cannot split, before a file is written or a bar drawn.
        model = _rank_model(runner_class, config, settings, 0)
        progress = tqdm(total=world_size * len(checkpoint_targets(model)), unit="tensor", disable=not show_progress,
                        desc="splitting")
        written_bytes = 0

        def advance(name: str, nbytes: int) -> None:
            nonlocal written_bytes
            written_bytes += nbytes
            progress.set_postfix_str(f"{written_bytes / 2**20:.1f} MiB", refresh=False)
            progress.update(1)

        with progress:
            for rank in range(world_size):
                progress.set_description(f"splitting rank {rank}/{world_size}")
                model = model if rank == 0 else _rank_model(runner_class, config, settings, rank)
                model.to(dtype)
                shards = _rank_shards(model, checkpoint, advance)
                rank_dir = out_dir / f"rank_{rank}"
                _copy_side_files(source, rank_dir)
                save_file(shards, str(rank_dir / "model.safetensors"), metadata={"format": "pt"})
                del model, shards
    _copy_side_files(source, out_dir)
    split_settings = {**settings, "model_path": str(out_dir.resolve())}
    split_settings["model_config"] = {**settings["model_config"], "enable_online_split_weight": False}
    settings_path = out_dir / SPLIT_SETTINGS_FILE
    settings_path.write_text(yaml.safe_dump(split_settings, sort_keys=False))
    return settings_path


def runner_class_for(model_name: str) -> type[ModelRunner]:
    """The ModelRunner subclass of the generated port `generated_models.<model_name>`."""
    module_name = f"generated_models.{model_name}.runner_{model_name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise SettingsError(
            f"model_name '{model_name}' has no generated port ({module_name}); run recipes-scaffold {model_name}"
        ) from None
    runners = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, ModelRunner) and value is not ModelRunner]
    return runners[0]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recipes-scaffold split-weights",
        description="Split a checkpoint into per-rank shards (DIR/rank_{i}/) for the YAML's parallel_config.",
    )
    parser.add_argument("--config", required=True, help="runner_settings YAML (model_name, model_path, sizes)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write rank_{i}/ into")
    parser.add_argument("--model-path", help="checkpoint folder; overrides model_path in the YAML")
    args = parser.parse_args(argv)
    settings = load_runner_settings(args.config, {"model_path": args.model_path} if args.model_path else {})
    torch.set_grad_enabled(False)
    settings_path = split_checkpoint(runner_class_for(settings["model_name"]), settings, args.out)
    print(f"wrote {settings['world_size']} rank folders under {args.out}; run them with {settings_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
