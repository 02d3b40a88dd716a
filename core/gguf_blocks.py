"""`import-gguf --keep-quantized`: a GGUF file's Q4_0, Q4_1 and Q8_0 linear weights written as `int_groups` tensors
(core/quantization/int_groups.py) instead of dequantized floats, so a port runs the file's own codes.

Names and row orders come from transformers' GGUF reader (its name map and its per-architecture tensor processor,
which un-permutes llama's q/k rows): the processor is run on the row indices, so whatever it does to rows is done
to the codes and scales. A tensor it reshapes in any other way, and every other GGUF type, is dequantized as
transformers' loader does it; the kept tensors are never dequantized, which also makes this import fast.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.errors import CheckpointError
from core.quantization.int_groups import pack_nibbles

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


def write_kept_checkpoint(gguf_file: Path, staging: Path, dtype: torch.dtype) -> Counter:
    """Write into `staging` the HF checkpoint of `gguf_file` (config, generation config, tokenizer, weights) whose
    linear weights stored as Q4_0 / Q4_1 / Q8_0 keep their codes; every other tensor is dequantized to `dtype`
    as transformers' GGUF loader would. Returns how many tensors of each GGUF type were kept."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise CheckpointError(f"{gguf_file}: transformers cannot read it: {str(error).splitlines()[0]}") from None
    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    parsed["tensors"] = {}
    processor = TENSOR_PROCESSORS.get(parsed["config"].get("model_type"), TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(model, processor)
    names = {module: f"{module_name}.weight" for module_name, module in model.named_modules()}
    linears = {names[module] for module in names if isinstance(module, torch.nn.Linear)}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    untie = head is not None and head.weight is embedding.weight

    tensors: dict[str, torch.Tensor] = {}
    kept: Counter = Counter()
    for tensor in gguf.GGUFReader(gguf_file).tensors:
        kind, hf_name = tensor.tensor_type.name, mapping.get(tensor.name)
        target = names[head] if untie and hf_name == names[embedding] else hf_name
        order = None
        if kind in KEPT_TYPES and target in linears and len(tensor.shape) == 2:
            order = _row_order(processor, tensor.name, int(tensor.shape[1]), mapping, parsed)
        if order is not None:
            for role, part in decode_blocks(kind, _blocks(tensor)[order]).items():
                tensors[f"{target}_{role}"] = part.contiguous()
            kept[kind] += 1
            if target == hf_name:
                continue  # the tied embedding also gathers these rows dequantized, below
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name in mapping:
            tensors[mapping[result.name]] = torch.from_numpy(np.copy(result.weights)).to(dtype)
    tensors.update({key: value.to(dtype) for key, value in parsed["tensors"].items()})
    if untie and kept:
        config.tie_word_embeddings = False
    expected = {key for key in model.state_dict() if not (untie and not kept and key == names[head])}
    missing = sorted(key for key in expected if key not in tensors and f"{key}_codes" not in tensors)
    if missing:
        raise CheckpointError(f"{gguf_file.name}: no tensor for {', '.join(missing[:3])}"
                              f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; import it without "
                              f"--keep-quantized")

    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config.dtype, config.architectures = dtype, [type(model).__name__]
    config.quantization_config = {"quant_method": "int_groups", "group_size": GROUP,
                                  "gguf_types_kept": dict(sorted(kept.items()))}
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return kept
