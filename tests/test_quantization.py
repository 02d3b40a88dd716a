"""The quantization methods' dequantizers and slicing against the formats' definitions (the reference quantizers
in scaffold/tiny_quantized.py), on hand-made tensors: what a rank reads equals the same slice of the whole."""

import json

import pytest
import torch
from safetensors.torch import save_file

from core.errors import CheckpointError
from core.quantization import BlockSplitError, QuantizedCheckpoint, quantization_method
from core.safetensors_reader import SafetensorsCheckpoint
from scaffold.tiny_quantized import (
    FP4_E2M1_VALUES,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    quantize_mxfp4,
)


def open_quantized(folder, tensors, quantization_config):
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization_config": quantization_config}))
    method = quantization_method(quantization_config, "dequantize", folder / "config.json")
    return QuantizedCheckpoint(SafetensorsCheckpoint(folder), method)


@pytest.fixture
def fp8_edge(tmp_path):
    """A 40 x 48 weight in 16 x 32 blocks: a partial last block along both dimensions."""
    torch.manual_seed(0)
    weight, grid = quantize_fp8_blocks(torch.randn(40, 48), (16, 32))
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]}
    checkpoint = open_quantized(tmp_path, {"w.weight": weight, "w.weight_scale_inv": grid}, config)
    return checkpoint, dequantize_fp8_blocks(weight, grid, (16, 32))


def test_fp8_partial_edge_blocks_dequantize_as_documented(fp8_edge):
    checkpoint, expected = fp8_edge
    assert checkpoint.names() == ["w.weight"]
    assert torch.equal(checkpoint.get_slice("w.weight")[:], expected)


@pytest.mark.parametrize("index", [(slice(16, 40),), (slice(0, 16),), (slice(None), slice(32, 48))])
def test_fp8_rank_slices_read_their_rows_of_weight_and_grid(fp8_edge, index):
    checkpoint, expected = fp8_edge
    assert torch.equal(checkpoint.get_slice("w.weight")[index], expected[index])


def test_fp8_slice_that_cuts_a_block_is_refused(fp8_edge):
    checkpoint, _ = fp8_edge
    with pytest.raises(BlockSplitError, match=r"rows \[0, 20\) of dimension 0 of 'w.weight' \(size 40\) cut its 16-wide"):
        checkpoint.get_slice("w.weight")[0:20]


def test_mxfp4_round_trips_representable_values_exactly(tmp_path):
    """Values that are fp4 codes times a power of two per 32-block survive quantize → dequantize bit for bit,
    in the experts' [experts, in, out] layout, and a rank's input rows read only their blocks."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (2, 64, 8))
    exponents = torch.randint(-4, 4, (2, 2, 8)).repeat_interleave(32, dim=1)
    weight = torch.tensor(FP4_E2M1_VALUES)[codes] * torch.exp2(exponents.float())
    weight[:, 0] = 6.0 * torch.exp2(exponents[:, 0].float())  # each block's largest value fixes its exponent
    weight[:, 32] = 6.0 * torch.exp2(exponents[:, 32].float())
    blocks, scales = quantize_mxfp4(weight.transpose(-1, -2))
    checkpoint = open_quantized(tmp_path, {"e.up_blocks": blocks, "e.up_scales": scales}, {"quant_method": "mxfp4"})
    tensor = checkpoint.get_slice("e.up")
    assert tensor.get_shape() == [2, 64, 8]
    assert torch.equal(tensor[:], weight)
    assert torch.equal(tensor[:, 32:64], weight[:, 32:64])
    assert torch.equal(tensor[:, :, 4:8], weight[:, :, 4:8])
    with pytest.raises(BlockSplitError, match="32-wide"):
        tensor[:, 16:48]


def test_mxfp4_collect_mode_keeps_the_stored_pieces(tmp_path):
    blocks, scales = quantize_mxfp4(torch.randn(2, 8, 64))
    checkpoint = open_quantized(tmp_path, {"e.up_blocks": blocks, "e.up_scales": scales}, {"quant_method": "mxfp4"})
    with checkpoint.reading("collect") as pieces:
        shape_only = checkpoint.get_slice("e.up")[:, 32:64]
    assert shape_only.device.type == "meta" and list(shape_only.shape) == [2, 32, 8]
    [(dim, kept_blocks)] = pieces["e.up"]["blocks"]
    assert dim == 2 and torch.equal(kept_blocks, blocks[:, :, 1:2])


def test_unknown_method_names_the_supported_ones(tmp_path):
    with pytest.raises(CheckpointError, match=r"quantization 'gptq'.*supported: fp8, int_groups, mxfp4"):
        quantization_method({"quant_method": "gptq"}, "dequantize", tmp_path / "config.json")


def test_static_activation_scales_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="activation_scheme 'static'"):
        quantization_method({"quant_method": "fp8", "activation_scheme": "static"}, "dequantize", "config.json")
