"""Tiny quantized checkpoints in the Hub's own layouts, written by hand from a tiny random HF checkpoint.

- `mxfp4` (gpt-oss): each experts tensor `<name>` [experts, in, out] becomes `<name>_blocks` uint8
  [experts, out, in/32, 16] (two fp4 e2m1 codes a byte, the low nibble first) and `<name>_scales` uint8
  [experts, out, in/32] (e8m0: the block's power of two plus 127).
- `fp8` (DeepSeek-V3, Qwen3-*-FP8): each linear weight [out, in] becomes float8_e4m3fn with a float32
  `weight_scale_inv` grid [ceil(out/bn), ceil(in/bk)] (multiply to dequantize); edge blocks may be partial.

The quantizers here are plain reference code written from the formats' definitions; the runtime's
dequantizers live in `core.quantization` and are checked against transformers' own loader.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from scaffold.errors import ScaffoldError
from scaffold.quantized_formats import QUANTIZATIONS
from scaffold.tiny import build_tiny_checkpoint

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32
FP8_E4M3_MAX = 448.0
TINY_FP8_BLOCK = (16, 16)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] → blocks [..., rows, cols/32, 16] and e8m0 scales [..., rows, cols/32]."""
    *lead, rows, cols = weight.shape
    if cols % MXFP4_BLOCK:
        raise ScaffoldError(f"mxfp4 needs the input dimension to be a multiple of {MXFP4_BLOCK}, got {cols}")
    groups = weight.float().reshape(*lead, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    values = torch.tensor(FP4_E2M1_VALUES)
    codes = (scaled.unsqueeze(-1) - values).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] → float8_e4m3fn weight and the float32 grid that multiplies it back, one scale a block."""
    rows, cols = weight.shape
    block_rows, block_cols = block
    grid = torch.empty(math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = weight[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols].float()
            scale = float(tile.abs().max()) / FP8_E4M3_MAX or 1.0
            grid[i, j] = scale
            quantized[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols] = (
                (tile / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
            )
    return quantized, grid


def dequantize_fp8_blocks(quantized: torch.Tensor, grid: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The documented math, tile by tile: tiles of the config's `weight_block_size`, an edge tile as many rows
    and columns as remain."""
    block_rows, block_cols = block
    out = quantized.float()
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            out[i * block_rows:(i + 1) * block_rows, j * block_cols:(j + 1) * block_cols] *= grid[i, j]
    return out


def _hf_model(folder: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config)


def _fp8_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """What transformers' fine-grained FP8 converts: every nn.Linear but the LM head, and the experts' tensors
    (saved one linear per expert, `<experts>.<n>.<proj>.weight`)."""
    linears = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    experts = {name for name, module in model.named_modules()
               if any(param.dim() == 3 for param in module.parameters(recurse=False))}
    per_expert = re.compile(r"^(.*)\.\d+\.[^.]+\.weight$")
    return [name for name in names
            if name in linears or ((match := per_expert.match(name)) and match.group(1) in experts)]


def _mxfp4_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """What transformers' MXFP4 converts: the experts' 3-D weight tensors (not their biases)."""
    return [name for name, param in model.named_parameters() if param.dim() == 3 and name in names]


def build_tiny_quantized_checkpoint(model_type: str, out_dir: str | Path, quantization: str, seed: int = 0,
                                    **config_overrides) -> Path:
    """A tiny random `model_type` checkpoint whose quantizable tensors are stored as `quantization` does."""
    if quantization not in QUANTIZATIONS:
        raise ScaffoldError(f"unknown quantization '{quantization}'; choose one of {', '.join(QUANTIZATIONS)}")
    out_dir = build_tiny_checkpoint(model_type, out_dir, seed=seed, **config_overrides)
    weights_file = out_dir / "model.safetensors"
    tensors = load_file(weights_file)
    model = _hf_model(out_dir)
    names = sorted(tensors)
    stored: dict[str, torch.Tensor] = {}
    if quantization == "mxfp4":
        targets = _mxfp4_targets(model, names)
        for name in targets:
            blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(-1, -2))
            stored[f"{name}_blocks"], stored[f"{name}_scales"] = blocks, scales
        quantization_config = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    else:
        targets = _fp8_targets(model, names)
        for name in targets:
            weight, grid = quantize_fp8_blocks(tensors.pop(name), TINY_FP8_BLOCK)
            stored[name], stored[f"{name}_scale_inv"] = weight, grid
        quantization_config = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(TINY_FP8_BLOCK),
            "modules_to_not_convert": ["lm_head"],
        }
    if not targets:
        raise ScaffoldError(f"{model_type} has no tensors that {quantization} quantizes")
    save_file({**tensors, **stored}, str(weights_file), metadata={"format": "pt"})
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _read_right_by_transformers(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> bool:
    """transformers infers the FP8 block from the scale grid (rows // grid rows): right unless a tensor spans
    more than one block along a dimension and ends in a partial one."""
    for name, grid in tensors.items():
        if name.endswith("_scale_inv"):
            shape = tensors[name.removesuffix("_scale_inv")].shape
            if any(size % step and blocks > 1 for size, step, blocks in zip(shape, block, grid.shape)):
                return False
    return True


def hf_reference_folder(quantized_dir: Path, scratch: Path) -> Path:
    """The folder HF eager should read as the reference for `quantized_dir`: the folder itself where
    transformers dequantizes it right, else (FP8 with partial edge blocks) the documented math's copy in
    `scratch`."""
    config = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    if config["quant_method"] != "fp8":
        return quantized_dir
    if _read_right_by_transformers(load_file(quantized_dir / "model.safetensors"), tuple(config["weight_block_size"])):
        return quantized_dir
    return write_dequantized_reference(quantized_dir, scratch)


def write_dequantized_reference(quantized_dir: Path, out_dir: Path) -> Path:
    """The same checkpoint with every FP8 tensor dequantized by the documented math: a reference for HF eager
    where transformers' own loader infers the block size from the scale grid (wrong for partial edge blocks)."""
    import shutil

    shutil.copytree(quantized_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    tensors = load_file(out_dir / "model.safetensors")
    for name in [name for name in tensors if name.endswith("_scale_inv")]:
        weight_name = name.removesuffix("_scale_inv")
        tensors[weight_name] = dequantize_fp8_blocks(tensors[weight_name], tensors.pop(name), block)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_low_bit_reference(checkpoint: Path, out_dir: Path, scheme: str, group: int = 32) -> Path:
    """`checkpoint` with every linear weight the int4 / int8 CPU kernels can run replaced by the float weight those
    kernels multiply by (`model_config.weight_quant` quantizes the same way at load): HF eager's reference for a
    low-bit port. A tied LM head is untied, since the port quantizes the head but gathers embeddings in float."""
    from core.quantization.low_bit import (
        int4_groups_fit,
        int8_as_float,
        int_groups_as_float,
        quantize_int4,
        quantize_int8,
    )

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            if scheme == "int8":
                weight.copy_(int8_as_float(quantize_int8(weight)))
            elif int4_groups_fit(weight.shape, group) is None:
                weight.copy_(int_groups_as_float(*quantize_int4(weight, group), group))
    model.save_pretrained(out_dir)
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / extra).exists() and not (out_dir / extra).exists():
            (out_dir / extra).write_bytes((checkpoint / extra).read_bytes())
    return out_dir
