"""A checkpoint's tensors under the names the model gives them.

A checkpoint written by transformers' `save_pretrained` may name or lay out tensors differently from the modules
(per-expert MoE tensors for a fused experts parameter): `ModelNamedCheckpoint` reads those through transformers'
own conversion mapping for the model, lazily, so that a rank still reads only its slice.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from core.errors import CheckpointError
from core.safetensors_reader import SafetensorsCheckpoint


def _normalised_index(index, ndim: int) -> list[slice]:
    """`[a:b]`, `[:, a:b]`, … as one step-1 slice per dimension."""
    items = list(index if isinstance(index, tuple) else (index,))
    if len(items) > ndim or not all(isinstance(item, slice) and item.step in (None, 1) for item in items):
        raise IndexError(f"only step-1 slices, at most one per dimension of {ndim}, are supported; got {index}")
    return items + [slice(None)] * (ndim - len(items))


class StackedSlice:
    """Checkpoint tensors stacked along a new dimension `dim` (transformers' MergeModulelist: one tensor per expert
    → [experts, ...]), read lazily: indexing reads only the indexed part of each tensor it touches."""

    def __init__(self, parts: list, dim: int):
        self.parts, self.dim = parts, dim

    def get_shape(self) -> list[int]:
        shape = list(self.parts[0].get_shape())
        shape.insert(self.dim, len(self.parts))
        return shape

    def __getitem__(self, index) -> torch.Tensor:
        items = _normalised_index(index, len(self.get_shape()))
        chosen = range(*items.pop(self.dim).indices(len(self.parts)))
        return torch.stack([self.parts[number][tuple(items)] for number in chosen], dim=self.dim)


class ConcatenatedSlice:
    """Tensors concatenated along `dim` (transformers' Concatenate: gate and up → gate|up), read lazily: indexing
    along `dim` reads only the parts it overlaps."""

    def __init__(self, parts: list, dim: int):
        self.parts, self.dim = parts, dim

    def get_shape(self) -> list[int]:
        shape = list(self.parts[0].get_shape())
        shape[self.dim] = sum(part.get_shape()[self.dim] for part in self.parts)
        return shape

    def __getitem__(self, index) -> torch.Tensor:
        items = _normalised_index(index, len(self.get_shape()))
        start, stop, _ = items[self.dim].indices(self.get_shape()[self.dim])
        pieces, offset = [], 0
        for part in self.parts:
            size = part.get_shape()[self.dim]
            if start < offset + size and stop > offset:
                items[self.dim] = slice(max(start - offset, 0), min(stop - offset, size))
                pieces.append(part[tuple(items)])
            offset += size
        return torch.cat(pieces, dim=self.dim)


def conversion_transforms(model: torch.nn.Module) -> list:
    """transformers' checkpoint conversion mapping for the model: by class name first, then by model_type (as
    `transformers.conversion_mapping.extract_weight_conversions_for_model` looks it up)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for key in (type(model).__name__, model_type):
        transforms = get_checkpoint_conversion_mapping(key) if key else None
        if transforms:
            return transforms
    return []


def _module_list_number(pattern: str, key: str) -> int:
    """The module-list index a `*` of a converter's source pattern (a regex, as transformers reads it) stands for
    in `key`: the expert number."""
    match = re.search(pattern.replace("*", r"(\d+)"), key)
    return int(match.group(1)) if match and match.groups() else 0


# A multimodal checkpoint's text causal LM under its composite model: transformers 5's layout, then the older one.
TEXT_TOWER_RENAMES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                      ("language_model.lm_head.", "lm_head."))
TEXT_TOWER_PREFIXES = tuple(prefix for prefix, _ in TEXT_TOWER_RENAMES)


def _text_tower_name(name: str) -> str:
    """`name` as the text-only causal LM calls it (its vision and audio towers' tensors keep theirs, unused)."""
    for prefix, replacement in TEXT_TOWER_RENAMES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


class ModelNamedCheckpoint:
    """A checkpoint's tensors under the names the model gives them. A name the checkpoint holds is read as it is;
    otherwise transformers' conversion mapping (`transformers/conversion_mapping.py`) for the model may derive it,
    as a lazy slice, from differently named tensors: a renamed one (Mixtral's `block_sparse_moe.` → `mlp.`), or a
    fused experts parameter assembled from per-expert tensors (`experts.0.w1.weight`, … → `experts.gate_up_proj`).
    transformers 5.x modules hold fused 3-D experts while `save_pretrained` writes the per-expert layout;
    assembling lazily lets a tensor-parallel rank read only its slice of each expert."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, transforms: list):
        self.checkpoint = checkpoint
        self.folder = checkpoint.folder
        self.renamed: dict[str, str] = {}
        # model name → (converter, {source pattern: {expert number: checkpoint name}})
        self.converted: dict[str, tuple[WeightConverter, dict[str, dict[int, str]]]] = {}
        names = checkpoint.names()
        composite = any(name.startswith(TEXT_TOWER_PREFIXES) for name in names)
        for name in names if transforms or composite else ():
            self._add(name, transforms)

    def _add(self, name: str, transforms: list) -> None:
        # A composite checkpoint's tensor is offered under its own name and, for a text-only port, under the text
        # model's; transformers' conversion mapping applies to either.
        for start in dict.fromkeys((name, _text_tower_name(name))):
            key = start
            for transform in transforms:
                renamed, pattern = transform.rename_source_key(key)
                if pattern is not None and isinstance(transform, WeightConverter):
                    _, parts = self.converted.setdefault(renamed, (transform, defaultdict(dict)))
                    parts[pattern][_module_list_number(pattern, key)] = name
                    break
                key = renamed
            else:
                if key != name and key not in self.checkpoint:
                    self.renamed[key] = name

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint or name in self.renamed or name in self.converted

    def names(self) -> list[str]:
        return self.checkpoint.names()

    def sources(self, name: str) -> list[str]:
        """The checkpoint tensors `name` is read from."""
        if name in self.checkpoint:
            return [name]
        if name in self.renamed:
            return [self.renamed[name]]
        _, parts = self.converted[name]
        return [source for numbered in parts.values() for source in numbered.values()]

    def get_slice(self, name: str):
        if name in self.renamed and name not in self.checkpoint:
            return self.checkpoint.get_slice(self.renamed[name])
        if name in self.converted and name not in self.checkpoint:
            return self._assembled(name)
        return self.checkpoint.get_slice(name)  # a name it lacks raises the checkpoint's own "missing" error

    def _assembled(self, name: str):
        """transformers' operations for `name`, applied lazily to its checkpoint tensors in source-pattern order."""
        converter, parts = self.converted[name]
        tensors = [[self.checkpoint.get_slice(numbered[number]) for number in sorted(numbered)]
                   for numbered in (parts[pattern] for pattern in converter.source_patterns if pattern in parts)]
        for operation in converter.operations:
            if isinstance(operation, MergeModulelist):
                tensors = [[StackedSlice(group, operation.dim)] for group in tensors]
            elif isinstance(operation, Concatenate):
                tensors = [[ConcatenatedSlice([part for group in tensors for part in group], operation.dim)]]
            else:
                raise CheckpointError(
                    f"tensor '{name}' is assembled from {', '.join(converter.source_patterns)} by transformers' "
                    f"{type(operation).__name__}, which the loader cannot do lazily; load it once with transformers "
                    f"and write model.state_dict() with safetensors' save_file (save_pretrained writes the "
                    f"original layout back)"
                )
        if len(tensors) != 1 or len(tensors[0]) != 1:
            raise CheckpointError(f"tensor '{name}': transformers' operations for it leave {len(tensors)} tensors, "
                                  f"not one")
        return tensors[0][0]
