"""Fuzzing palettized checkpoints: every damaged file loads to the original model or fails with a clear error.

Each case mutates one thing in a valid checkpoint and loads it with plain `from_pretrained`. The outcome must be
either a model whose outputs equal the original's exactly (the mutation changed nothing that matters, e.g. an extra
metadata key) or a `PalettizedCheckpointError`; any other exception, or a model computing something else, fails.

What is mutated, and why only that:
- headers of the palettized tensors (LUT, packed indices, scale): dtype, shape, offsets, presence, name;
- offsets of any tensor, and the header as a whole (length prefix, JSON, `__metadata__`);
- the file length (truncation, trailing bytes);
- tensor data where the format pins it down: NaN/inf LUT and scale values, and the padding bits after
  the last packed index.
Other LUT or index bytes changed to other valid values decode to other valid weights, and the shape or dtype of an
unclustered tensor (LayerNorm, bias) can only be checked against the model: without checksums no format can tell
those from the real thing, so they are not fuzzed here (shapes of unclustered tensors are covered when the model is
passed to `check_palettized_files`, see test_checkpoint.py).
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModel, BertConfig, BertModel
from transformers.utils import logging

import dkm_hf
from dkm_hf import PalettizedCheckpointError
from dkm_hf.integrations.safetensors_files import SAFETENSORS_DTYPES

logging.set_verbosity_error()
logging.disable_progress_bar()

PADDED = "encoder.layer.0.intermediate.dense"  # 37 x 32 weights in 16-vectors: 74 indices, 6 padding slots
FLOAT_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
KINDS = ("entry", "offsets", "metadata", "header", "length", "nonfinite", "padding")


class Checkpoint:
    def __init__(self, root: Path):
        torch.manual_seed(0)
        dense = root / "dense"
        BertModel(
            BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
        ).save_pretrained(dense)
        config = dkm_hf.DKMConfig(
            bits=3,
            weight_threshold=0,
            per_channel_scale=True,
            overrides={
                r".*intermediate\.dense": {"cluster_dim": 16},
                r".*attention\.self\.query": {"bits": 4, "granularity": "per_grouped_channel", "group_size": 4},
                r".*word_embeddings": {"per_channel_scale": False, "cluster_dim": 2},
            },
        )
        model = dkm_hf.palettize(AutoModel.from_pretrained(dense, dkm_config=config))
        self.valid = root / "valid"
        model.save_pretrained(self.valid)
        self.inputs = torch.randint(0, 99, (2, 7))
        with torch.no_grad():
            self.expected = model(self.inputs).last_hidden_state
        raw = (self.valid / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        self.header = json.loads(raw[8 : 8 + length])
        self.data = raw[8 + length :]
        self.names = sorted(k for k in self.header if k != "__metadata__")
        self.palettized = [
            k for k in self.names if k.rsplit(".", 1)[1] in ("weight_lut", "weight_indices", "weight_scale")
        ]
        self.root, self.counter = root, itertools.count()

    def write(self, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
        path = self.root / f"case{next(self.counter)}"
        shutil.copytree(self.valid, path)
        blob = header if isinstance(header, bytes) else json.dumps(header).encode()
        prefix = struct.pack("<Q", len(blob) if length is None else length)
        (path / "model.safetensors").write_bytes(prefix + blob + data)
        return path

    def check(self, path: Path) -> str:
        try:
            model = AutoModel.from_pretrained(path)
        except PalettizedCheckpointError:
            return "refused"
        finally:
            shutil.rmtree(path, ignore_errors=True)
        with torch.no_grad():
            assert torch.equal(model(self.inputs).last_hidden_state, self.expected), "loaded different weights"
        return "loaded"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Checkpoint(tmp_path_factory.mktemp("fuzz"))


def _poke(ckpt: Checkpoint, name: str, position: int, value: bytes) -> bytes:
    begin, end = ckpt.header[name]["data_offsets"]
    at = begin + position * len(value)
    assert at + len(value) <= end
    return ckpt.data[:at] + value + ckpt.data[at + len(value) :]


def _flip(ckpt: Checkpoint, bit: int) -> bytes:
    """Flip bit `bit` (0-23) of the last 3-byte block of the padded module's packed indices."""
    end = ckpt.header[f"{PADDED}.weight_indices"]["data_offsets"][1]
    at = end - 3 + bit // 8
    return ckpt.data[:at] + bytes([ckpt.data[at] ^ (1 << bit % 8)]) + ckpt.data[at + 1 :]


def mutate(ckpt: Checkpoint, draw, kind: str) -> Path:
    header = json.loads(json.dumps(ckpt.header))
    data = ckpt.data
    if kind == "entry":
        name = draw(st.sampled_from(ckpt.palettized))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "extra", "type"]))
        entry = header[name]
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from([*SAFETENSORS_DTYPES, "F4", "f16", ""]))
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 800), max_size=4))
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-1, len(data) + 8), min_size=0, max_size=3))
        elif field == "delete":
            del header[name]
        elif field == "rename":
            header[draw(st.text(min_size=1, max_size=40))] = header.pop(name)
        elif field == "extra":
            entry[draw(st.text(max_size=8))] = draw(st.integers())
        else:
            header[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers())))
    elif kind == "offsets":
        name = draw(st.sampled_from(ckpt.names))
        begin, end = header[name]["data_offsets"]
        delta = draw(st.integers(-64, 64).filter(bool))
        header[name]["data_offsets"] = draw(st.sampled_from([[begin + delta, end], [begin, end + delta]]))
    elif kind == "metadata":
        meta = header["__metadata__"]
        key = draw(st.sampled_from(["dkm_format_version", "dkm_format", "format", "other"]))
        action = draw(st.sampled_from(["set", "delete", "replace"]))
        if action == "set":
            meta[key] = draw(
                st.one_of(st.sampled_from(["1", "2", "0", "palettized", "train", "pt"]), st.text(max_size=6))
            )
        elif action == "delete":
            meta.pop(key, None)
        else:
            header["__metadata__"] = draw(
                st.one_of(st.none(), st.integers(), st.dictionaries(st.text(), st.integers()))
            )
    elif kind == "header":
        blob = json.dumps(header).encode()
        choice = draw(st.sampled_from(["cut", "garbage", "not_object", "length"]))
        if choice == "cut":
            return ckpt.write(blob[: draw(st.integers(0, len(blob) - 1))], data)
        if choice == "garbage":
            return ckpt.write(draw(st.binary(max_size=64)), data)
        if choice == "not_object":
            return ckpt.write(json.dumps(draw(st.one_of(st.lists(st.integers()), st.text()))).encode(), data)
        return ckpt.write(blob, data, length=draw(st.integers(0, 2**64 - 1).filter(lambda n: n != len(blob))))
    elif kind == "length":
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data) - 1))]
        else:
            data = data + draw(st.binary(min_size=1, max_size=32))
    elif kind == "nonfinite":
        name = draw(st.sampled_from([k for k in ckpt.palettized if not k.endswith("weight_indices")]))
        dtype = header[name]["dtype"]
        count = (header[name]["data_offsets"][1] - header[name]["data_offsets"][0]) // FLOAT_BYTES[dtype]
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        raw = torch.tensor([value], dtype=TORCH_DTYPES[dtype])
        data = _poke(ckpt, name, draw(st.integers(0, count - 1)), raw.view(torch.uint8).numpy().tobytes())
    else:  # padding: the last 3-byte block holds 2 indices (bits 0-5) and 18 padding bits (6-23)
        data = _flip(ckpt, draw(st.integers(6, 23)))
    return ckpt.write(header, data)


def _run(ckpt: Checkpoint, data, outcomes: dict) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    outcome = ckpt.check(mutate(ckpt, data.draw, kind))
    outcomes.setdefault(kind, {}).setdefault(outcome, 0)
    outcomes[kind][outcome] += 1


FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
ALWAYS_REFUSED = ("offsets", "header", "length", "nonfinite", "padding")


def test_fuzzed_checkpoints_load_exactly_or_fail_cleanly(ckpt):
    outcomes: dict = {}

    @settings(FUZZ, max_examples=300)
    @given(st.data())
    def run(data):
        _run(ckpt, data, outcomes)

    run()
    print(outcomes)
    assert sum(n for kind in outcomes.values() for n in kind.values()) >= 300
    assert set(outcomes) == set(KINDS)
    for kind in ALWAYS_REFUSED:
        assert set(outcomes[kind]) == {"refused"}, (kind, outcomes[kind])
    # a header entry can be "mutated" into itself (same shape drawn, renamed to its own name): it then loads
    assert outcomes["entry"]["refused"] > 10 * outcomes["entry"].get("loaded", 0)
    assert outcomes["metadata"].get("loaded", 0) > 0  # e.g. an extra or rewritten `format` key changes nothing
    assert outcomes["metadata"].get("refused", 0) > 0


@pytest.mark.slow
def test_fuzzed_checkpoints_many(ckpt):
    @settings(FUZZ, max_examples=3000, derandomize=False)
    @given(st.data())
    def run(data):
        _run(ckpt, data, {})

    run()


@pytest.mark.parametrize("with_checksums", [True, False])
def test_every_padding_bit_is_checked(ckpt, with_checksums):
    """74 3-bit indices: the last block uses bits 0-5. Without checksums (files written before they existed)
    flipping one of those changes a weight and any other is refused; with checksums every flip is refused."""
    header = json.loads(json.dumps(ckpt.header))
    if not with_checksums:
        header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if not k.startswith("dkm_crc32")}
    results = {}
    for bit in range(24):
        try:
            results[bit] = ckpt.check(ckpt.write(header, _flip(ckpt, bit)))
        except AssertionError:
            results[bit] = "different weights"
    expected = "refused" if with_checksums else "different weights"
    assert results == {b: expected if b < 6 else "refused" for b in range(24)}
