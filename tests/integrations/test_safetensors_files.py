"""Reading safetensors headers: what a header may hold, and the shards of one save."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from dkm_hf import PalettizedCheckpointError
from dkm_hf.integrations.safetensors_files import read_header, read_headers


def _raw(path, header: dict, data: bytes) -> str:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def test_overlapping_offsets_are_refused(tmp_path):
    """Two tensors sharing bytes tile nothing: refused, as safetensors refuses them (one that starts inside
    another, not only one that leaves a gap)."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    with pytest.raises(PalettizedCheckpointError, match="'b' starts at byte 4 .* expected 8"):
        read_header(_raw(tmp_path / "x.safetensors", header, bytes(8)))
    header["b"]["data_offsets"] = [8, 12]
    assert set(read_header(_raw(tmp_path / "y.safetensors", header, bytes(12))).tensors) == {"a", "b"}


def test_shards_of_two_saves_or_holding_one_tensor_twice_are_refused(tmp_path):
    """Every shard must carry the same save id (a directory mixing shards of two saves), and a tensor must be stored
    in one shard only."""
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    save_file({"a": torch.zeros(2)}, one, metadata={"dkm_save_id": "x"})
    save_file({"b": torch.zeros(2)}, two, metadata={"dkm_save_id": "y"})
    with pytest.raises(PalettizedCheckpointError, match="two.safetensors: written by save 'y' but one.safetensors"):
        read_headers([one, two])
    save_file({"a": torch.ones(2)}, two, metadata={"dkm_save_id": "x"})
    with pytest.raises(PalettizedCheckpointError, match="tensor 'a' is stored twice"):
        read_headers([one, two])
    save_file({"b": torch.ones(2)}, two, metadata={"dkm_save_id": "x"})
    assert set(read_headers([one, two]).tensors) == {"a", "b"}


def test_a_header_entry_with_fields_beyond_dtype_shape_and_offsets_is_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}
    with pytest.raises(PalettizedCheckpointError, match="'a' has a malformed header entry"):
        read_header(_raw(tmp_path / "x.safetensors", header, bytes(8)))


def test_a_suffix_that_two_names_end_with_finds_neither():
    """Without the model's prefix, `find` matches a name by suffix only when one name has it: `x.w` against
    `a.x.w` and `b.x.w` is ambiguous (None), not whichever sorts first."""
    from dkm_hf.integrations.safetensors_files import NameTable

    table = NameTable({"a.x.w": 1, "b.x.w": 2, "c.y.w": 3})
    assert table.find("x.w") is None
    assert table.find("y.w") == 3 and table.find("a.x.w") == 1
