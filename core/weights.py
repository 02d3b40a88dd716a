"""Fill a model's parameters and persistent buffers from a checkpoint, tensor by tensor.

A parameter may carry its own `weight_loader(param, checkpoint_slice)` (the vLLM / nano-vllm pattern) to read
only the part it owns; every other parameter is copied whole with its shape checked. A quantized checkpoint
(`core.quantization.QuantizedCheckpoint`) is read through the same loaders: its tensors dequantize as they are
sliced, and before any weight is read every rank's slices are checked to keep whole quantization blocks.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from core.checkpoint_mapping import ConcatenatedSlice, ModelNamedCheckpoint, conversion_transforms
from core.errors import CheckpointError, SettingsError
from core.quantization import BlockSplitError, PackedWeight, QuantizedCheckpoint
from core.quantization.base import join_pieces
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


def _sources(name: str, target, presplit: bool, checkpoint: ModelNamedCheckpoint) -> list[str]:
    """The checkpoint tensors a parameter is read from: its own name, or — for a layer merged from sibling layers
    (q|k|v stored as q_proj, k_proj, v_proj) — each sibling's, unless an offline split already saved it merged."""
    merged_from = getattr(target, "merged_from", None)
    if merged_from is None or (presplit and name in checkpoint):
        return [name]
    parent = name.rsplit(".", 2)[0]
    return [f"{parent}.{sibling}" for sibling in merged_from]


def _stored_aliases(model: torch.nn.Module, sources: dict[str, list[str]],
                    checkpoint: ModelNamedCheckpoint) -> dict[str, list[str]]:
    """A tied parameter is filled under the name the checkpoint stores it by: CamemBERT's head is built before its
    encoder, so the tied tensor is `lm_head.decoder.weight` to the model and the embedding to the checkpoint."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    found = {}
    for name, param in model.named_parameters():
        if sources.get(name) == [name] and name not in checkpoint:
            stored = next((alias for alias in aliases[id(param)] if alias in checkpoint), None)
            if stored is not None:
                found[name] = [stored]
    return found


def checkpoint_targets(model: torch.nn.Module) -> dict[str, torch.Tensor | PackedWeight]:
    """What a checkpoint fills: every parameter (a tied one once), every persistent buffer and every packed
    (kept quantized) weight, by name."""
    persistent = model.state_dict(keep_vars=True)
    targets: dict[str, torch.Tensor | PackedWeight] = dict(model.named_parameters())
    targets.update((name, buffer) for name, buffer in model.named_buffers() if name in persistent)
    targets.update((name, module) for name, module in model.named_modules() if isinstance(module, PackedWeight))
    return targets


def _held_bytes(target: torch.Tensor | PackedWeight) -> int:
    if isinstance(target, PackedWeight):
        return target.packed_bytes()
    return target.numel() * target.element_size()


def _fill(target: torch.Tensor, name: str, sources: list[str], checkpoint: ModelNamedCheckpoint,
          presplit: bool) -> None:
    """Read `target` from its sources: through its own weight_loader (this rank's part), or whole from an
    offline split (merged siblings were saved one after the other along the rows)."""
    loader = getattr(target, "weight_loader", None)
    if presplit and len(sources) > 1:
        default_weight_loader(target, ConcatenatedSlice([checkpoint.get_slice(s) for s in sources], 0), name)
    elif loader is None or presplit:
        default_weight_loader(target, checkpoint.get_slice(sources[0]), name)
    elif len(sources) == 1:  # its own name, or the alias a tied tensor is stored under
        loader(target, checkpoint.get_slice(sources[0]))
    else:
        for shard_id, source in enumerate(sources):
            loader(target, checkpoint.get_slice(source), shard_id)


def _shape_only(target: torch.Tensor | PackedWeight) -> torch.Tensor:
    """A stand-in for `target` that its loader fills without memory: its shape on the meta device (a packed
    weight's: the shape and loader of the parameter it replaced)."""
    if isinstance(target, PackedWeight):
        meta = torch.empty(target.local_shape, device="meta")
        if target.replaced_loader is not None:
            meta.weight_loader = target.replaced_loader
        return meta
    meta = torch.empty_like(target, device="meta")
    for attribute in ("weight_loader", "merged_from"):
        if hasattr(target, attribute):
            setattr(meta, attribute, getattr(target, attribute))
    return meta


def _fill_packed(target: PackedWeight, name: str, sources: list[str], checkpoint: ModelNamedCheckpoint,
                 quantized: QuantizedCheckpoint, presplit: bool) -> None:
    """Keep the stored pieces of exactly the rows the replaced parameter's loader would read."""
    with quantized.reading("collect") as pieces:
        _fill(_shape_only(target), name, sources, checkpoint, presplit)
    if not pieces:
        raise CheckpointError(f"packed weight '{name}' is not stored quantized in the checkpoint")
    # Merged siblings (q|k|v, gate|up) were read one after the other: their rows stack in that order.
    joined = [join_pieces(parts) for parts in pieces.values()]
    if any(part.keys() != joined[0].keys() for part in joined):
        raise CheckpointError(f"packed weight '{name}' is merged from tensors quantized in different forms: "
                              f"{', '.join(pieces)}")
    target.store({role: torch.cat([part[role] for part in joined]) for role in joined[0]})


def _tp_degree(model: torch.nn.Module, name: str, target) -> str:
    group = getattr(target, "tp_group", None)
    if group is None and "." in name:
        group = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "tp_group", None)
    return f"{group.name}_size {group.size}" if group is not None else "its tensor-parallel size"


def check_quantized_splits(model: torch.nn.Module, checkpoint: ModelNamedCheckpoint, quantized: QuantizedCheckpoint,
                           targets: dict, sources: dict[str, list[str]], names: set[str]) -> None:
    """Every rank's slice of a quantized tensor must keep whole blocks: checked from shapes alone, before any
    weight is read, so that a TP degree the blocks cannot follow fails naming the layer."""
    with quantized.reading("probe"):
        for name in sorted(names):
            target = targets[name]
            try:
                _fill(_shape_only(target), name, sources[name], checkpoint, presplit=False)
            except BlockSplitError as error:
                raise SettingsError(
                    f"layer '{name}': {error} at {_tp_degree(model, name, target)}; choose a parallel size that "
                    f"gives every rank whole blocks"
                ) from None


def held_whole(model: torch.nn.Module, checkpoint: SafetensorsCheckpoint | QuantizedCheckpoint) -> dict[str, int]:
    """name → bytes of every tensor this rank holds entirely (as large as what the checkpoint stores for it): at
    TP>1 what tensor parallelism did not split, norms and routers by design, anything else to review."""
    named = ModelNamedCheckpoint(checkpoint, conversion_transforms(model))
    targets = checkpoint_targets(model)
    sources = {name: _sources(name, target, False, named) for name, target in targets.items()}
    sources.update(_stored_aliases(model, sources, named))
    whole = {}
    for name, target in targets.items():
        if isinstance(target, PackedWeight) or not all(source in named for source in sources[name]):
            continue
        stored = sum(math.prod(named.get_slice(source).get_shape()) for source in sources[name])
        if target.numel() >= stored:
            whole[name] = _held_bytes(target)
    return whole


def load_checkpoint_into(
    model: torch.nn.Module,
    checkpoint: SafetensorsCheckpoint | QuantizedCheckpoint,
    presplit: bool = False,
    on_tensor_loaded: Callable[[str, int], None] | None = None,
    keep_quantized: bool = False,
) -> list[str]:
    """Fill every parameter and persistent buffer of `model` from `checkpoint`; a missing tensor is an error.
    Returns the names (the model's) of what it filled.

    presplit: the checkpoint already holds this rank's shards (an offline split), so every tensor is copied
    whole instead of through the parameter's own slicing `weight_loader`.
    on_tensor_loaded(name, bytes held by this rank) is called after each tensor (progress display).
    keep_quantized: leave the targets a quantized checkpoint stores quantized unfilled, only running their
    loaders so that the stored pieces this rank owns are read (an offline split collects them under
    `checkpoint.reading("collect")`).
    """
    named = ModelNamedCheckpoint(checkpoint, conversion_transforms(model))
    if isinstance(checkpoint, QuantizedCheckpoint):
        checkpoint.method.pack(model, named)
    targets = checkpoint_targets(model)
    sources = {name: _sources(name, target, presplit, named) for name, target in targets.items()}
    sources.update(_stored_aliases(model, sources, named))
    missing = [source for names in sources.values() for source in names if source not in named]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {checkpoint.folder} lacks tensors the model needs: {shown}")
    quantized = set()
    if isinstance(checkpoint, QuantizedCheckpoint):
        quantized = {name for name in targets
                     if any(checkpoint.is_quantized(stored) for source in sources[name]
                            for stored in named.sources(source))}
        if not presplit:
            check_quantized_splits(model, named, checkpoint, targets, sources, quantized)
    filled = []
    with torch.no_grad():
        for name, target in targets.items():
            if isinstance(target, PackedWeight):
                _fill_packed(target, name, sources[name], named, checkpoint, presplit)
            elif keep_quantized and name in quantized:
                _fill(_shape_only(target), name, sources[name], named, presplit)
            else:
                _fill(target, name, sources[name], named, presplit)
            if not (keep_quantized and name in quantized):
                filled.append(name)
            if on_tensor_loaded is not None:
                on_tensor_loaded(name, _held_bytes(target))
    used = {stored for names in sources.values() for source in names for stored in named.sources(source)}
    unused = sorted(set(named.names()) - used)
    if unused:
        logger.warning("%d checkpoint tensors are not used by the model, e.g. %s", len(unused), unused[0])
    return filled
