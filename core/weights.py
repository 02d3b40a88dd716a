"""Fill a model's parameters and persistent buffers from a checkpoint, tensor by tensor.

A parameter may carry its own `weight_loader(param, checkpoint_slice)` (the vLLM / nano-vllm pattern) to read
only the part it owns; every other parameter is copied whole with its shape checked.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from core.checkpoint_mapping import ModelNamedCheckpoint, conversion_transforms
from core.errors import CheckpointError
from core.safetensors_reader import SafetensorsCheckpoint

logger = logging.getLogger(__name__)


def default_weight_loader(param: torch.Tensor, checkpoint_slice, name: str) -> None:
    """Copy a whole checkpoint tensor into `param`, casting to its dtype."""
    shape = tuple(checkpoint_slice.get_shape())
    if shape != tuple(param.shape):
        raise CheckpointError(
            f"tensor '{name}' has shape {list(shape)} in the checkpoint but the model expects {list(param.shape)}"
        )
    param.data.copy_(checkpoint_slice[:])


def _sources(name: str, target: torch.Tensor, presplit: bool, checkpoint: ModelNamedCheckpoint) -> list[str]:
    """The checkpoint tensors a parameter is read from: its own name, or — for a layer merged from sibling layers
    (q|k|v stored as q_proj, k_proj, v_proj) — each sibling's, unless an offline split already saved it merged."""
    merged_from = getattr(target, "merged_from", None)
    if merged_from is None or (presplit and name in checkpoint):
        return [name]
    parent = name.rsplit(".", 2)[0]
    return [f"{parent}.{sibling}" for sibling in merged_from]


def checkpoint_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint fills: every parameter (a tied one once) and every persistent buffer, by name."""
    persistent = model.state_dict(keep_vars=True)
    targets = dict(model.named_parameters())
    targets.update((name, buffer) for name, buffer in model.named_buffers() if name in persistent)
    return targets


def load_checkpoint_into(
    model: torch.nn.Module,
    checkpoint: SafetensorsCheckpoint,
    presplit: bool = False,
    on_tensor_loaded: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Fill every parameter and persistent buffer of `model` from `checkpoint`; a missing tensor is an error.
    Returns the names (the model's) of what it filled.

    presplit: the checkpoint already holds this rank's shards (an offline split), so every tensor is copied
    whole instead of through the parameter's own slicing `weight_loader`.
    on_tensor_loaded(name, bytes held by this rank) is called after each tensor (progress display).
    """
    checkpoint = ModelNamedCheckpoint(checkpoint, conversion_transforms(model))
    targets = checkpoint_targets(model)
    sources = {name: _sources(name, target, presplit, checkpoint) for name, target in targets.items()}
    missing = [source for names in sources.values() for source in names if source not in checkpoint]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {checkpoint.folder} lacks tensors the model needs: {shown}")
    with torch.no_grad():
        for name, target in targets.items():
            loader = None if presplit and sources[name] == [name] else getattr(target, "weight_loader", None)
            if loader is None:
                default_weight_loader(target, checkpoint.get_slice(name), name)
            elif sources[name] == [name]:
                loader(target, checkpoint.get_slice(name))
            else:
                for shard_id, source in enumerate(sources[name]):
                    loader(target, checkpoint.get_slice(source), shard_id)
            if on_tensor_loaded is not None:
                on_tensor_loaded(name, target.numel() * target.element_size())
    used = {stored for names in sources.values() for source in names for stored in checkpoint.sources(source)}
    unused = sorted(set(checkpoint.names()) - used)
    if unused:
        logger.warning("%d checkpoint tensors are not used by the model, e.g. %s", len(unused), unused[0])
    return list(targets)
