"""Quantized checkpoints: one module per method behind `QuantizationMethod`; add the next one to METHODS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.quantization.base import BlockSplitError, PackedWeight, QuantizationMethod, QuantizedSlice
from core.quantization.checkpoint import QuantizedCheckpoint
from core.quantization.fp8 import Fp8Method
from core.quantization.int_groups import IntGroupsMethod
from core.quantization.mxfp4 import Mxfp4Method

METHODS: dict[str, type[QuantizationMethod]] = {
    method.name: method for method in (Fp8Method, IntGroupsMethod, Mxfp4Method)
}

__all__ = [
    "METHODS",
    "BlockSplitError",
    "PackedWeight",
    "QuantizationMethod",
    "QuantizedCheckpoint",
    "QuantizedSlice",
    "declared_quantization",
    "quantization_method",
]


def declared_quantization(config) -> dict[str, Any] | None:
    """A transformers config's `quantization_config` as a plain dict (quant_method and its settings), or None."""
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is None or isinstance(quantization_config, dict):
        return quantization_config
    return quantization_config.to_dict()


def quantization_method(quantization_config: dict[str, Any], weight_mode: str,
                        config_file: Path) -> QuantizationMethod:
    """The registered method a checkpoint's `quantization_config` names, set up from it."""
    name = quantization_config.get("quant_method", "unknown")
    if name not in METHODS:
        raise CheckpointError(
            f"{config_file} declares quantization '{name}', which is not supported (supported: "
            f"{', '.join(sorted(METHODS))}); dequantize the checkpoint to safetensors first"
        )
    return METHODS[name](quantization_config, weight_mode, str(config_file))
