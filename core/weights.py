"""Read HF safetensors checkpoints (one file or sharded) tensor by tensor into a model's parameters.

A parameter may carry its own `weight_loader(param, checkpoint_slice)` (the vLLM / nano-vllm pattern) to read
only the part it owns; every other parameter is copied whole with its shape checked.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

logger = logging.getLogger(__name__)


class SafetensorsCheckpoint:
    """The tensors of one checkpoint folder, opened lazily; use as a context manager to close the files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self.file_of_tensor = self._index_tensors()
        self._files = ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self._files.close()
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of_tensor

    def names(self) -> list[str]:
        return sorted(self.file_of_tensor)

    def get_slice(self, name: str):
        """A lazy view of one tensor: index it (`[:]`, `[a:b]`) to read only that part from disk."""
        if name not in self.file_of_tensor:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint in {self.folder}")
        return self._handle(self.file_of_tensor[name]).get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[:]

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"cannot read {path}: {error} (is the file truncated?)") from None
        return self._handles[path]

    def _index_tensors(self) -> dict[str, Path]:
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {error}") from None
            missing = sorted({file for file in weight_map.values() if not (self.folder / file).is_file()})
            if missing:
                raise CheckpointError(f"{index_path} names shard files that are missing: {', '.join(missing)}")
            return {name: self.folder / file for name, file in weight_map.items()}
        single_path = self.folder / SINGLE_FILE
        if single_path.is_file():
            try:
                with safe_open(str(single_path), framework="pt") as handle:
                    return {name: single_path for name in handle.keys()}
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"cannot read {single_path}: {error} (is the file truncated?)") from None
        raise CheckpointError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def default_weight_loader(param: torch.Tensor, checkpoint_slice, name: str) -> None:
    """Copy a whole checkpoint tensor into `param`, casting to its dtype."""
    shape = tuple(checkpoint_slice.get_shape())
    if shape != tuple(param.shape):
        raise CheckpointError(
            f"tensor '{name}' has shape {list(shape)} in the checkpoint but the model expects {list(param.shape)}"
        )
    param.data.copy_(checkpoint_slice[:])


def load_checkpoint_into(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, presplit: bool = False) -> None:
    """Fill every parameter and persistent buffer of `model` from `checkpoint`; a missing tensor is an error.

    presplit: the checkpoint already holds this rank's shards (an offline split), so every tensor is copied
    whole instead of through the parameter's own slicing `weight_loader`.
    """
    persistent = model.state_dict(keep_vars=True)
    targets = dict(model.named_parameters())
    targets.update((name, buffer) for name, buffer in model.named_buffers() if name in persistent)
    missing = [name for name in targets if name not in checkpoint]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {checkpoint.folder} lacks tensors the model needs: {shown}")
    with torch.no_grad():
        for name, target in targets.items():
            loader = None if presplit else getattr(target, "weight_loader", None)
            if loader is None:
                default_weight_loader(target, checkpoint.get_slice(name), name)
            else:
                loader(target, checkpoint.get_slice(name))
    unused = sorted(set(checkpoint.names()) - set(persistent))
    if unused:
        logger.warning("%d checkpoint tensors are not used by the model, e.g. %s", len(unused), unused[0])
