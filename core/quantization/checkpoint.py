"""A quantized checkpoint seen through its method: each group of stored tensors (weight and scale, blocks and
scales) appears as one tensor under its logical name, read lazily as a `QuantizedSlice`.

`reading(mode)` says what indexing such a slice does, and collects the stored pieces read meanwhile:
- "dequantize": read the stored parts under the range and return them dequantized (loading a model);
- "collect": read them but return only a shape (an offline split or a PackedWeight keeps the pieces);
- "probe": read nothing, only check that the range keeps whole blocks (before any weight is read).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch

from core.quantization.base import QuantizationMethod, QuantizedSlice
from core.safetensors_reader import SafetensorsCheckpoint


class QuantizedCheckpoint:
    def __init__(self, checkpoint: SafetensorsCheckpoint, method: QuantizationMethod):
        self.checkpoint, self.method, self.folder = checkpoint, method, checkpoint.folder
        self.quantized = method.quantized_slices(checkpoint.tensors, self)
        stored_in_groups = {part.name for group in self.quantized.values() for part in group.parts.values()}
        self.plain = {name: tensor for name, tensor in checkpoint.tensors.items() if name not in stored_in_groups}
        self.mode = "dequantize"
        self.recorder: dict | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.quantized or name in self.plain

    def names(self) -> list[str]:
        return sorted([*self.quantized, *self.plain])

    def is_quantized(self, name: str) -> bool:
        return name in self.quantized

    def get_slice(self, name: str):
        if name in self.quantized:
            return self.quantized[name]
        return self.checkpoint.get_slice(name)

    def dtype(self) -> torch.dtype:
        return self.checkpoint.dtype()

    @contextlib.contextmanager
    def reading(self, mode: str) -> Iterator[dict[str, dict[str, list]]]:
        """Index quantized slices in `mode`; yields {logical name: {role: [(dim, stored piece), …]}} of what was
        read (nothing in "probe" mode)."""
        saved = self.mode, self.recorder
        self.mode, self.recorder = mode, defaultdict(lambda: defaultdict(list))
        try:
            yield self.recorder
        finally:
            self.mode, self.recorder = saved

    def read(self, tensor: QuantizedSlice, ranges: dict, out_shape: list[int]) -> torch.Tensor:
        if self.mode == "probe":
            return torch.empty(out_shape, device="meta")
        pieces = tensor.read_parts(ranges)
        if self.recorder is not None:
            for role, piece in pieces.items():
                self.recorder[tensor.name][role].append((ranges[role][0] if role in ranges else None, piece))
        if self.mode == "collect":
            return torch.empty(out_shape, device="meta")
        return tensor.dequantize(pieces)
