"""The safetensors reader reads exactly what safetensors itself reads, for whole tensors and one narrowed dimension."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import CheckpointError
from core.safetensors_reader import SafetensorsCheckpoint

TENSORS = {
    "matrix": torch.randn(6, 10),
    "experts": torch.randn(3, 5, 8),
    "half": torch.randn(4, 6).to(torch.bfloat16),
    "vector": torch.arange(7, dtype=torch.int64),
}
SLICES = [
    ("matrix", (slice(None),)),
    ("matrix", (slice(2, 5),)),
    ("matrix", (slice(None), slice(3, 7))),
    ("experts", (slice(None), slice(None), slice(4, 8))),
    ("experts", (slice(None), slice(1, 3))),
    ("half", (slice(None), slice(0, 3))),
    ("vector", (slice(2, 6),)),
]


@pytest.fixture
def folder(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("name, index", SLICES)
def test_slices_match_safetensors(folder, name, index):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as reference, \
            SafetensorsCheckpoint(folder) as checkpoint:
        expected = reference.get_slice(name)[index]
        got = checkpoint.get_slice(name)[index]
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_strided_reads_use_bounded_chunks(folder, monkeypatch):
    monkeypatch.setattr("core.safetensors_reader.STRIDED_READ_CHUNK_BYTES", 40)
    with SafetensorsCheckpoint(folder) as checkpoint:
        got = checkpoint.get_slice("experts")[:, :, 2:5]
    assert torch.equal(got, TENSORS["experts"][:, :, 2:5])


def test_two_narrowed_dimensions_are_refused(folder):
    with SafetensorsCheckpoint(folder) as checkpoint, pytest.raises(IndexError, match="one dimension"):
        checkpoint.get_slice("matrix")[1:3, 2:4]


def test_truncated_file_names_the_tensor(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '\w+' ends at byte"):
        SafetensorsCheckpoint(folder)
