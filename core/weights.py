"""Read HF safetensors checkpoints (one file or sharded) tensor by tensor into a model's parameters.

A parameter may carry its own `weight_loader(param, checkpoint_slice)` (the vLLM / nano-vllm pattern) to read
only the part it owns; every other parameter is copied whole with its shape checked.

Files are read with positioned reads, not memory-mapped: a mapped file's touched pages count in the process's
resident memory, and a rank that reads every other column of a tensor (a split of its last dim) touches all of
its pages. With positioned reads a rank's memory is its shards plus one bounded read buffer.

A checkpoint written by transformers' `save_pretrained` may name or lay out tensors differently from the modules
(per-expert MoE tensors for a fused experts parameter): `ModelNamedCheckpoint` reads those through transformers'
own conversion mapping for the model, lazily, so that a rank still reads only its slice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

STRIDED_READ_CHUNK_BYTES = 32 * 2**20
DIRECT_RUN_BYTES = 64 * 2**10
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

logger = logging.getLogger(__name__)


class TensorSlice:
    """One checkpoint tensor, read lazily: `tensor[:]`, or `tensor[:, a:b]` to read only columns a..b.

    Indexing takes slices (step 1) and may narrow one dimension: what parallel layers need.
    """

    def __init__(self, file: "_SafetensorsFile", name: str, dtype: str, shape: list[int], offset: int):
        self.file, self.name, self.dtype_name, self.shape, self.offset = file, name, dtype, shape, offset
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor '{name}' in {file.path} has dtype {dtype}, which is not supported")
        self.dtype = SAFETENSORS_DTYPES[dtype]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype_name

    def __getitem__(self, index) -> torch.Tensor:
        ranges = self._ranges(index if isinstance(index, tuple) else (index,))
        narrowed = [dim for dim, (start, stop) in enumerate(ranges) if (start, stop) != (0, self.shape[dim])]
        if len(narrowed) > 1:
            raise IndexError(f"{self.name}: only one dimension can be narrowed at a time, got {index}")
        if not narrowed:
            return self._read_range(0, 0, self.shape[0] if self.shape else 1)
        dim = narrowed[0]
        return self._read_range(dim, *ranges[dim])

    def _ranges(self, index: tuple) -> list[tuple[int, int]]:
        if len(index) > len(self.shape) and not (len(index) == 1 and not self.shape):
            raise IndexError(f"{self.name}: {len(index)} indices for a {len(self.shape)}-d tensor")
        ranges = []
        for dim, size in enumerate(self.shape):
            item = index[dim] if dim < len(index) else slice(None)
            if not isinstance(item, slice) or item.step not in (None, 1):
                raise IndexError(f"{self.name}: only step-1 slices are supported, got {item!r}")
            start, stop, _ = item.indices(size)
            ranges.append((start, max(start, stop)))
        return ranges

    def _read_range(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dimension `dim`, every other dimension whole."""
        shape = list(self.shape)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        outer = math.prod(shape[:dim])
        inner_bytes = math.prod(shape[dim + 1 :]) * itemsize
        row_bytes = (shape[dim] if shape else 1) * inner_bytes
        run_bytes = (stop - start) * inner_bytes
        out = torch.empty(outer * run_bytes, dtype=torch.uint8)
        if run_bytes == row_bytes or run_bytes >= DIRECT_RUN_BYTES:
            for row in range(outer):
                self.file.read_into(out[row * run_bytes : (row + 1) * run_bytes],
                                    self.offset + row * row_bytes + start * inner_bytes)
        else:
            rows_per_chunk = max(1, STRIDED_READ_CHUNK_BYTES // row_bytes)
            buffer = torch.empty(rows_per_chunk * row_bytes, dtype=torch.uint8)
            for first in range(0, outer, rows_per_chunk):
                count = min(rows_per_chunk, outer - first)
                chunk = buffer[: count * row_bytes]
                self.file.read_into(chunk, self.offset + first * row_bytes)
                rows = chunk.view(count, shape[dim], inner_bytes)[:, start:stop]
                out[first * run_bytes : (first + count) * run_bytes].view(count, stop - start, inner_bytes).copy_(rows)
        if shape:
            shape[dim] = stop - start
        return out.view(self.dtype).reshape(shape)


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.descriptor = os.open(path, os.O_RDONLY)
            header_length = struct.unpack("<Q", os.pread(self.descriptor, 8, 0))[0]
            header = json.loads(os.pread(self.descriptor, header_length, 8))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"cannot read {path}: {error} (is the file truncated or not safetensors?)") from None
        header.pop("__metadata__", None)
        data_start = 8 + header_length
        file_size = os.fstat(self.descriptor).st_size
        self.tensors = {}
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if data_start + end > file_size:
                raise CheckpointError(
                    f"{path} is truncated: tensor '{name}' ends at byte {data_start + end} of a {file_size}-byte file"
                )
            self.tensors[name] = TensorSlice(self, name, entry["dtype"], entry["shape"], data_start + begin)

    def read_into(self, target: torch.Tensor, offset: int) -> None:
        view = memoryview(target.numpy()).cast("B")
        done = 0
        while done < len(view):
            count = os.preadv(self.descriptor, [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(f"{self.path} ended early at byte {offset + done} (truncated?)")
            done += count

    def close(self) -> None:
        os.close(self.descriptor)


class SafetensorsCheckpoint:
    """The tensors of one checkpoint folder; use as a context manager to close the files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self._files: list[_SafetensorsFile] = []
        self.tensors: dict[str, TensorSlice] = {}
        try:
            for path in self._weight_files():
                file = _SafetensorsFile(path)
                self._files.append(file)
                self.tensors.update(file.tensors)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._files.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy view of one tensor: index it (`[:]`, `[a:b]`) to read only that part from disk."""
        if name not in self.tensors:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint in {self.folder}")
        return self.tensors[name]

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (its first one)."""
        for name in self.names():
            if self.tensors[name].dtype.is_floating_point:
                return self.tensors[name].dtype
        return torch.float32

    def _weight_files(self) -> list[Path]:
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {error}") from None
            missing = sorted({file for file in weight_map.values() if not (self.folder / file).is_file()})
            if missing:
                raise CheckpointError(f"{index_path} names shard files that are missing: {', '.join(missing)}")
            return [self.folder / file for file in sorted(set(weight_map.values()))]
        single_path = self.folder / SINGLE_FILE
        if single_path.is_file():
            return [single_path]
        raise CheckpointError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


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


def _conversion_transforms(model: torch.nn.Module) -> list:
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
        for name in checkpoint.names() if transforms else ():
            self._add(name, transforms)

    def _add(self, name: str, transforms: list) -> None:
        key = name
        for transform in transforms:
            renamed, pattern = transform.rename_source_key(key)
            if pattern is not None and isinstance(transform, WeightConverter):
                _, parts = self.converted.setdefault(renamed, (transform, defaultdict(dict)))
                parts[pattern][_module_list_number(pattern, key)] = name
                return
            key = renamed
        if key != name:
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
    checkpoint = ModelNamedCheckpoint(checkpoint, _conversion_transforms(model))
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
