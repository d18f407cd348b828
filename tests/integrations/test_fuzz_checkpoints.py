"""Fuzzing palettized checkpoints: every damaged checkpoint loads to the original model or fails with a clear error.

Each case mutates one thing in a valid checkpoint and loads it with plain `from_pretrained`. The outcome must be
either a model whose outputs equal the original's exactly (the mutation changed nothing that matters, e.g. an extra
metadata key) or a `PalettizedCheckpointError` / `ValueError` (a bad DKMConfig field); any other exception, a model
computing something else or a load that hangs fails the test.

What is mutated:
- headers of the palettized tensors (LUT, packed indices, scale): dtype, shape, offsets, presence, name;
- offsets of any tensor, and the header as a whole (length prefix, JSON, `__metadata__`);
- the file length (truncation, trailing bytes);
- the records in config.json (`quantization_config.modules`: fields, shapes, ties, presence) and its other fields;
- a shard index (the checkpoint split in two shards): missing or malformed fields, files outside the directory;
- tensor data of the palettized tensors: any byte (caught by the per-tensor checksums), NaN/inf LUT and scale
  values, the padding bits after the last packed index;
- the checksums and the save id: deleted (all, or one with a byte of its tensor changed), a LUT relabelled to
  another dtype of the same size with config.json's lut_dtype, the save id changed in the files or config.json.
Data of unclustered tensors (LayerNorm, biases) is not fuzzed: like any transformers checkpoint, it has no checksum.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
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
KINDS = (
    "entry", "offsets", "metadata", "header", "length", "record", "config", "index", "data", "nonfinite", "checksums"
)  # fmt: skip
ALWAYS_REFUSED = ("offsets", "header", "length", "data", "nonfinite", "checksums")
HANG_SECONDS = 60


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
        self.config = json.loads((self.valid / "config.json").read_text())
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

    def write(self, header: dict | bytes, data: bytes, length: int | None = None, config: dict | None = None) -> Path:
        path = self.root / f"case{next(self.counter)}"
        shutil.copytree(self.valid, path)
        blob = header if isinstance(header, bytes) else json.dumps(header).encode()
        prefix = struct.pack("<Q", len(blob) if length is None else length)
        (path / "model.safetensors").write_bytes(prefix + blob + data)
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        return path

    def sharded(self, edit_index) -> Path:
        """The checkpoint in two shards with an index, the index edited by `edit_index(index, path)`."""
        path = self.root / f"case{next(self.counter)}"
        shutil.copytree(self.valid, path)
        (path / "model.safetensors").unlink()
        halves = {"model-00001-of-00002.safetensors": self.names[::2], "model-00002-of-00002.safetensors": []}
        halves["model-00002-of-00002.safetensors"] = self.names[1::2]
        tensors = load_file(self.valid / "model.safetensors")
        for file, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, path / file, self.header["__metadata__"])
        index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
        text = edit_index(index, path)
        (path / "model.safetensors.index.json").write_text(text if text is not None else json.dumps(index))
        return path

    def check(self, path: Path) -> str:
        """'refused', 'loaded' (the same model), or a failure: 'different', 'hang', '<ExceptionName>'."""

        def timeout(*_):
            raise TimeoutError

        previous = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(HANG_SECONDS)
        try:
            model = AutoModel.from_pretrained(path)
            with torch.no_grad():
                same = torch.equal(model(self.inputs).last_hidden_state, self.expected)
            return "loaded" if same else "different"
        except PalettizedCheckpointError:
            return "refused"
        except TimeoutError:
            return "hang"
        except ValueError:  # a DKMConfig field (or transformers' quantization_config) set to a bad value
            return "refused"
        except Exception as err:  # noqa: BLE001 - any other exception is what the test counts as a failure
            return f"{type(err).__name__}: {err}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            shutil.rmtree(path, ignore_errors=True)


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


def _json_values():
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 2**65), st.floats(), st.text(max_size=8), st.lists(st.integers())
    )


def mutate(ckpt: Checkpoint, draw, kind: str) -> Path:
    header = json.loads(json.dumps(ckpt.header))
    config = json.loads(json.dumps(ckpt.config))
    data = ckpt.data
    if kind == "entry":
        name = draw(st.sampled_from(ckpt.palettized))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "extra", "type"]))
        entry = header[name]
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from([*SAFETENSORS_DTYPES, "F4", "f16", ""]))
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.one_of(st.integers(-2, 800), st.just(2**64 + 1)), max_size=4))
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
        choice = draw(st.sampled_from(["cut", "garbage", "not_object", "length", "duplicate", "surrogate"]))
        if choice == "cut":
            return ckpt.write(blob[: draw(st.integers(0, len(blob) - 1))], data)
        if choice == "garbage":
            return ckpt.write(draw(st.binary(max_size=64)), data)
        if choice == "not_object":
            return ckpt.write(json.dumps(draw(st.one_of(st.lists(st.integers()), st.text()))).encode(), data)
        if choice == "duplicate":  # a key twice inside one entry: the safetensors parser rejects it
            name = draw(st.sampled_from(ckpt.names))
            text = json.dumps(header[name])
            return ckpt.write(blob.replace(text.encode(), (text[:-1] + ', "dtype": "F32"}').encode(), 1), data)
        if choice == "surrogate":  # a lone surrogate in a tensor name
            name = draw(st.sampled_from(ckpt.names))
            return ckpt.write(blob.replace(json.dumps(name).encode(), b'"\\ud800' + name.encode() + b'"', 1), data)
        return ckpt.write(blob, data, length=draw(st.integers(0, 2**64 - 1).filter(lambda n: n != len(blob))))
    elif kind == "length":
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data) - 1))]
        else:
            data = data + draw(st.binary(min_size=1, max_size=32))
    elif kind == "record":
        modules = config["quantization_config"]["modules"]
        name = draw(st.sampled_from(sorted(modules)))
        field = draw(st.sampled_from(["bits", "cluster_dim", "groups", "shape", "per_channel_scale", "extra"]))
        choice = draw(st.sampled_from(["field", "tie", "delete", "add", "replace"]))
        if choice == "field":
            modules[name][field] = draw(_json_values())
        elif choice == "tie":
            modules[name] = {"tied_to": draw(st.one_of(st.sampled_from(sorted(modules)), _json_values()))}
        elif choice == "delete":
            del modules[name]
        elif choice == "add":
            modules["encoder.layer.0.attention.output.LayerNorm"] = dict(modules[name])
        else:
            modules[name] = draw(_json_values())
    elif kind == "config":
        quant = config["quantization_config"]
        key = draw(st.sampled_from(["format", "format_version", "lut_dtype", "bits", "quant_method", "modules"]))
        if draw(st.booleans()):
            quant.pop(key)
        else:
            quant[key] = draw(st.one_of(st.sampled_from(["train", "palettized", "bfloat16", 1, 2]), _json_values()))
    elif kind == "index":
        choice = draw(st.sampled_from(["none", "no_map", "not_json", "missing", "parent", "absolute", "type"]))

        def edit(index, path):
            weight_map = index["weight_map"]
            if choice == "no_map":
                del index["weight_map"]
            elif choice == "missing":
                weight_map[ckpt.names[0]] = "model-00009-of-00009.safetensors"
            elif choice == "parent":
                shutil.move(path / "model-00002-of-00002.safetensors", path.parent / f"{path.name}-outside")
                for key, file in weight_map.items():
                    if file.startswith("model-00002"):
                        weight_map[key] = f"../{path.name}-outside"
            elif choice == "absolute":
                for key, file in weight_map.items():
                    weight_map[key] = str(path / file)
            elif choice == "type":
                weight_map[ckpt.names[1]] = draw(st.one_of(st.integers(), st.none(), st.lists(st.text())))
            elif choice == "not_json":
                return json.dumps(index)[: draw(st.integers(0, 40))]
            return None

        return ckpt.sharded(edit)
    elif kind == "data":
        name = draw(st.sampled_from(ckpt.palettized))
        begin, end = header[name]["data_offsets"]
        at = draw(st.integers(begin, end - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif kind == "nonfinite":
        name = draw(st.sampled_from([k for k in ckpt.palettized if not k.endswith("weight_indices")]))
        dtype = header[name]["dtype"]
        count = (header[name]["data_offsets"][1] - header[name]["data_offsets"][0]) // FLOAT_BYTES[dtype]
        value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        raw = torch.tensor([value], dtype=TORCH_DTYPES[dtype])
        data = _poke(ckpt, name, draw(st.integers(0, count - 1)), raw.view(torch.uint8).numpy().tobytes())
    elif kind == "checksums":
        meta = header["__metadata__"]
        choice = draw(st.sampled_from(["drop_all", "drop_one", "relabel", "file_id", "config_id", "no_file_id"]))
        if choice == "drop_all":
            header["__metadata__"] = {k: v for k, v in meta.items() if not k.startswith("dkm_crc32:")}
        elif choice == "drop_one":
            name = draw(st.sampled_from(ckpt.palettized))
            del meta[f"dkm_crc32:{name}"]
            begin, end = header[name]["data_offsets"]
            at = draw(st.integers(begin, end - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif choice == "relabel":  # the same bytes read as the other 2-byte float type
            for name in ckpt.palettized:
                if header[name]["dtype"] == "F16":
                    header[name]["dtype"] = "BF16"
            config["quantization_config"]["lut_dtype"] = "bfloat16"
        elif choice == "file_id":
            meta["dkm_save_id"] = draw(st.text(max_size=32).filter(lambda t: t != meta["dkm_save_id"]))
        elif choice == "no_file_id":
            del meta["dkm_save_id"]
        else:
            config["quantization_config"]["save_id"] = draw(
                st.one_of(st.none(), st.text(max_size=32)).filter(lambda t: t != meta["dkm_save_id"])
            )
    return ckpt.write(header, data, config=config if kind in ("record", "config", "checksums") else None)


FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _run(ckpt: Checkpoint, data, outcomes: dict) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    outcome = ckpt.check(mutate(ckpt, data.draw, kind))
    outcomes.setdefault(kind, {}).setdefault(outcome, 0)
    outcomes[kind][outcome] += 1


def test_fuzzed_checkpoints_load_exactly_or_fail_cleanly(ckpt):
    outcomes: dict = {}

    @settings(FUZZ, max_examples=600)
    @given(st.data())
    def run(data):
        _run(ckpt, data, outcomes)

    run()
    print("\nfuzzed checkpoints, outcome counts per mutation kind:")
    for kind in KINDS:
        print(f"  {kind:10s} {outcomes.get(kind)}")
    total = sum(n for kind in outcomes.values() for n in kind.values())
    failures = {k: {o: n for o, n in v.items() if o not in ("refused", "loaded")} for k, v in outcomes.items()}
    print(f"  total {total}, failures {sum(n for v in failures.values() for n in v.values())}")
    assert total >= 500
    assert set(outcomes) == set(KINDS)
    assert all(not v for v in failures.values()), failures
    for kind in ALWAYS_REFUSED:
        assert set(outcomes[kind]) == {"refused"}, (kind, outcomes[kind])
    assert outcomes["metadata"].get("loaded", 0) > 0  # e.g. an extra or rewritten `format` key changes nothing
    assert outcomes["index"].get("loaded", 0) > 0  # the unchanged two-shard index


@pytest.mark.slow
def test_fuzzed_checkpoints_many(ckpt):
    outcomes: dict = {}

    @settings(FUZZ, max_examples=3000, derandomize=False)
    @given(st.data())
    def run(data):
        _run(ckpt, data, outcomes)

    run()
    assert all(o in ("refused", "loaded") for kind in outcomes.values() for o in kind), outcomes


@pytest.mark.parametrize("with_checksums", [True, False])
def test_every_padding_bit_is_checked(ckpt, with_checksums):
    """74 3-bit indices: the last block uses bits 0-5. Without checksums (format version 1 files written before they
    existed) flipping one of those changes a weight and any other is refused; with checksums every flip is refused."""
    header = json.loads(json.dumps(ckpt.header))
    config = None
    if not with_checksums:
        kept = {
            k: v for k, v in header["__metadata__"].items() if not k.startswith("dkm_crc32") and k != "dkm_save_id"
        }
        header["__metadata__"] = kept | {"dkm_format_version": "1"}
        config = json.loads(json.dumps(ckpt.config))
        config["quantization_config"] |= {"format_version": 1, "save_id": None}
    results = {bit: ckpt.check(ckpt.write(header, _flip(ckpt, bit), config=config)) for bit in range(24)}
    expected = "refused" if with_checksums else "different"
    assert results == {b: expected if b < 6 else "refused" for b in range(24)}
