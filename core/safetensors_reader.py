"""Read HF safetensors checkpoints (one file or sharded) tensor by tensor, or only a slice of a tensor.

Files are read with positioned reads, not memory-mapped: a mapped file's touched pages count in the process's
resident memory, and a rank that reads every other column of a tensor (a split of its last dim) touches all of
its pages. With positioned reads a rank's memory is its shards plus one bounded read buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

STRIDED_READ_CHUNK_BYTES = 32 * 2**20
DIRECT_RUN_BYTES = 64 * 2**10
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


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
        """The dtype of the checkpoint's floating-point tensors (its first one wider than a byte: float8 weights
        are quantized, their dequantized values are not float8)."""
        for name in self.names():
            if self.tensors[name].dtype.is_floating_point and self.tensors[name].dtype.itemsize > 1:
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
