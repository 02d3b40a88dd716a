"""`import-gguf --keep-quantized`: a GGUF file's Q4_0, Q4_1 and Q8_0 linear weights written as `int_groups` tensors
(core/quantization/int_groups.py) instead of dequantized floats, so a port runs the file's own codes.

Names and row orders come from transformers' GGUF reader (its name map and its per-architecture tensor processor,
which un-permutes llama's q/k rows): the processor is run on the row indices, so whatever it does to rows is done
to the codes and scales. A tensor it reshapes in any other way, and every other GGUF type, stays dequantized.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.errors import CheckpointError
from core.quantization.int_groups import pack_nibbles

logger = logging.getLogger(__name__)

GROUP = 32
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _blocks(tensor) -> np.ndarray:
    """The tensor's raw blocks as [rows, groups, bytes per block]."""
    rows, columns = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists the fastest dimension first
    return np.asarray(tensor.data, dtype=np.uint8).reshape(rows, columns // GROUP, -1)


def decode_blocks(kind: str, data: np.ndarray) -> dict[str, torch.Tensor]:
    """Raw Q4_0 / Q4_1 / Q8_0 blocks [rows, groups, bytes] → int_groups parts (codes, float16 scales, mins)."""
    scales = torch.from_numpy(data[..., :2].copy().view(np.float16)[..., 0])
    if kind == "Q8_0":
        codes = torch.from_numpy(data[..., 2:].copy().view(np.int8)).flatten(-2)
        return {"codes": codes, "scales": scales}
    offset = 4 if kind == "Q4_1" else 2
    mins = (torch.from_numpy(data[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "Q4_1"
            else -8 * scales)  # Q4_0: scale · (code − 8)
    packed = torch.from_numpy(data[..., offset:].copy())
    # ggml's order: byte j of a block holds value j in its lower nibble and value j + 16 in its upper one.
    codes = torch.cat((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return {"codes": pack_nibbles(codes), "scales": scales, "mins": mins}


def _row_order(processor, tensor_name: str, rows: int, mapping: dict, parsed: dict) -> list[int] | None:
    """Which GGUF row each HF row is, by running transformers' processor on the row indices (None: not rows)."""
    indices = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    result = processor.process(weights=indices, name=tensor_name, tensor_key_mapping=mapping,
                               parsed_parameters=parsed)
    order = np.asarray(result.weights)
    if order.shape != (rows, 1) or sorted(order[:, 0].astype(int).tolist()) != list(range(rows)):
        return None
    return order[:, 0].astype(int).tolist()


def keep_quantized(gguf_file: Path, staging: Path, model: torch.nn.Module) -> Counter:
    """Rewrite `staging` (a dequantized import of `gguf_file`, made from `model`) so that its linear weights stored
    as Q4_0 / Q4_1 / Q8_0 keep their codes. Returns how many tensors of each GGUF type were kept."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    weights_file = staging / "model.safetensors"
    if not weights_file.exists():
        raise CheckpointError(f"{gguf_file.name}: --keep-quantized handles checkpoints saved as one safetensors "
                              f"file; this one was sharded")
    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    architecture = parsed["config"].get("model_type")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(model, processor)
    names = {module: f"{name}.weight" for name, module in model.named_modules()}
    linears = {names[module] for module in names if isinstance(module, torch.nn.Linear)}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    untie = head is not None and head.weight is embedding.weight

    tensors = load_file(weights_file)
    kept: Counter = Counter()
    for tensor in gguf.GGUFReader(gguf_file).tensors:
        kind, hf_name = tensor.tensor_type.name, mapping.get(tensor.name)
        if untie and hf_name == names[embedding]:
            target = names[head]  # the embedding gathers dequantized rows; the tied head keeps the codes
        elif hf_name in linears:
            target = hf_name
        else:
            continue
        if kind not in KEPT_TYPES or len(tensor.shape) != 2:
            continue
        data = _blocks(tensor)
        order = _row_order(processor, tensor.name, data.shape[0], mapping, parsed)
        if order is None:
            continue
        tensors.pop(target, None)
        for role, part in decode_blocks(kind, data[order]).items():
            tensors[f"{target}_{role}"] = part.contiguous()
        kept[kind] += 1
    save_file(tensors, str(weights_file), metadata={"format": "pt"})

    config_file = staging / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "int_groups", "group_size": GROUP,
                                     "gguf_types_kept": dict(sorted(kept.items()))}
    if untie and kept:
        config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return kept
