"""Reading a checkpoint's safetensors files without trusting them: headers parsed and checked before any tensor data
is read, shard indexes resolved only to files inside the checkpoint directory.

Loading never unpickles. A header the safetensors parser itself would reject (duplicate keys, sizes past 2^64,
invalid UTF-8, overlapping offsets) fails here with a `PalettizedCheckpointError` naming the file.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import stat
import struct
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import PalettizedCheckpointError

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
assert set(TORCH_DTYPES) == set(SAFETENSORS_DTYPES)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_BYTES = 2**63  # file offsets and sizes beyond this cannot be real
SAVE_ID_KEY = "dkm_save_id"  # the save that wrote a file (the same id is in config.json's quantization_config)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Set to 1 to follow a shard index or symlink out of the checkpoint directory (e.g. a hand-made layout).
ALLOW_OUTSIDE_ENV = "DKM_HF_ALLOW_FILES_OUTSIDE_CHECKPOINT"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes are, without reading them. `begin` and `end` count from
    the start of the data section, which is byte `data_start` of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str
    data_start: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class NameTable(Mapping[str, Any]):
    """A read-only mapping keyed by tensor name whose `find` also matches a name saved with or without the model's base
    prefix (`bert.encoder.x` against `encoder.x` and back). With `prefix` set (the loading model's
    `base_model_prefix`; "" for none) only that prefix is added or dropped; without it (no model at hand: a
    checkpoint read on its own) any one name ending with the other matches, found in O(depth + log n): a header holds
    up to millions of names and every clustered module looks up a few of them."""

    def __init__(self, items: Mapping[str, Any], prefix: str | None = None) -> None:
        self._items = dict(items)
        self._reversed: list[str] | None = None
        self.prefix = prefix

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> KeysView[str]:
        return self._items.keys()

    def values(self) -> ValuesView[Any]:
        return self._items.values()

    def items(self) -> ItemsView[str, Any]:
        return self._items.items()

    def find(self, key: str) -> Any | None:
        """items[key]; else the one item whose name ends with "." + key or that key ends with "." + name (None when
        there is none or more than one)."""
        if key in self._items:
            return self._items[key]
        if self.prefix is not None:  # a model's block.proj is not its proj: only the base prefix may differ
            if not self.prefix:
                return None
            other = key[len(self.prefix) + 1 :] if key.startswith(self.prefix + ".") else f"{self.prefix}.{key}"
            return self._items.get(other)
        parts = key.split(".")
        matches = [name for name in (".".join(parts[i:]) for i in range(1, len(parts))) if name in self._items]
        if self._reversed is None:
            self._reversed = sorted(name[::-1] for name in self._items)
        prefix = ("." + key)[::-1]
        at = bisect.bisect_left(self._reversed, prefix)
        for candidate in self._reversed[at : at + 2]:
            if candidate.startswith(prefix):
                matches.append(candidate[::-1])
        return self._items[matches[0]] if len(matches) == 1 else None


@dataclass
class SafetensorsHeader:
    tensors: NameTable
    metadata: dict[str, str]

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, NameTable):
            self.tensors = NameTable(self.tensors)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return table


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of one safetensors file (8-byte little-endian length, then JSON), reading no data.

    Offsets must tile the data section exactly, as safetensors itself requires, so a truncated or padded file is
    reported here with the byte counts instead of failing later.
    """
    path = os.fspath(path)
    where = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise PalettizedCheckpointError(
                    f"{where}: {size} bytes, too short for a safetensors header (truncated)"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise PalettizedCheckpointError(
                    f"{where}: header length {length} does not fit in the {size}-byte file (truncated or not "
                    "safetensors)"
                )
            raw = f.read(length)
    except OSError as err:
        raise PalettizedCheckpointError(f"{where}: cannot read the file ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8", errors="strict"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PalettizedCheckpointError(f"{where}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise PalettizedCheckpointError(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PalettizedCheckpointError(f"{where}: __metadata__ must map strings to strings, got {metadata!r}")
    for name in [*header, *metadata]:
        _check_text(where, name)
    tensors = {name: _entry(where, path, name, info, 8 + length) for name, info in header.items()}
    data_bytes = size - 8 - length
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise PalettizedCheckpointError(
                f"{where}: tensor {entry.name!r} starts at byte {entry.begin} of the data section, expected "
                f"{position} (overlapping or gapped offsets)"
            )
        position = entry.end
    if position > data_bytes:
        raise PalettizedCheckpointError(
            f"{where}: the header describes {position} bytes of tensor data but the file holds {data_bytes} "
            "(truncated)"
        )
    if position < data_bytes:
        raise PalettizedCheckpointError(
            f"{where}: {data_bytes - position} bytes after the last tensor that no header entry describes"
        )
    return SafetensorsHeader(tensors, dict(metadata))


def _check_text(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PalettizedCheckpointError(f"{where}: header name {text!r} is not valid UTF-8") from None


def _entry(where: str, path: str, name: str, info: Any, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has a malformed header entry {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if expected >= MAX_BYTES or end - begin != expected:
        raise PalettizedCheckpointError(
            f"{where}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its data_offsets "
            f"{offsets} span {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end, path, data_start)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_BYTES


def read_headers(files: Iterable[str | os.PathLike]) -> SafetensorsHeader:
    """The headers of all shards of one checkpoint, merged; a tensor stored in two shards is an error.

    Metadata keys starting with `dkm_format` must agree between shards, and every shard must carry the same save id
    (or none, as files written before save ids); other keys are merged.
    """
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    first: tuple[str, str | None] | None = None
    for path in files:
        header = read_header(path)
        save_id = header.metadata.get(SAVE_ID_KEY)
        if first is None:
            first = (os.path.basename(path), save_id)
        elif save_id != first[1]:
            raise PalettizedCheckpointError(
                f"{os.path.basename(path)}: written by save {save_id!r} but {first[0]} by save {first[1]!r}; the "
                "directory mixes files of two checkpoints (an interrupted save?)"
            )
        for name, entry in header.tensors.items():
            if name in tensors:
                raise PalettizedCheckpointError(
                    f"tensor {name!r} is stored twice: in {os.path.basename(tensors[name].file)} and "
                    f"{os.path.basename(entry.file)}"
                )
            tensors[name] = entry
        for key, value in header.metadata.items():
            if metadata.setdefault(key, value) != value and key.startswith("dkm_format"):
                raise PalettizedCheckpointError(
                    f"{os.path.basename(path)}: metadata {key}={value!r} differs from the other shards' "
                    f"{metadata[key]!r}"
                )
    return SafetensorsHeader(tensors, metadata)


def _allowed_roots(directory: Path) -> list[Path]:
    """The checkpoint directory, and inside a Hub cache snapshot (.../snapshots/<rev>, a subfolder of it, or a link
    to either) the repo's blobs/ folder its files link into."""
    roots = [directory.resolve()]
    for path in (directory.absolute(), roots[0]):
        snapshot = next((p for p in (path, *path.parents) if p.parent.name == "snapshots"), None)
        if snapshot is not None:
            roots.append((snapshot.parent.parent / "blobs").resolve())
    return roots


def check_inside(directory: str | os.PathLike, files: Iterable[str | os.PathLike]) -> None:
    """Refuse files that lie outside `directory` (an index naming '../x' or an absolute path, or a symlink leaving
    it), unless the environment variable DKM_HF_ALLOW_FILES_OUTSIDE_CHECKPOINT=1 allows them."""
    if os.environ.get(ALLOW_OUTSIDE_ENV) == "1":
        return
    directory = Path(directory)
    roots = _allowed_roots(directory)
    for file in files:
        resolved = Path(file).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise PalettizedCheckpointError(
                f"{directory}: weight file {os.fspath(file)!r} lies outside the checkpoint directory (it resolves to "
                f"{resolved}); refusing to read it. Set {ALLOW_OUTSIDE_ENV}=1 to allow it."
            )


def variant_name(name: str, variant: str | None) -> str:
    """transformers' file name of a weights `variant` ("model.safetensors" -> "model.v1.safetensors")."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def saved_variant(directory: str | os.PathLike) -> str | None:
    """The weights variant a save wrote into `directory` (`save_pretrained(variant=...)`): None where the plain
    names are there, else the one variant of its safetensors files (None if none or several)."""
    directory = Path(directory)
    if (directory / SINGLE_NAME).is_file() or (directory / INDEX_NAME).is_file():
        return None
    found = set()
    for name in os.listdir(directory):
        match = re.fullmatch(r"model\.safetensors\.index\.([^.]+)\.json|model\.([^.-]+)\.safetensors", name)
        if match:
            found.add(match.group(1) or match.group(2))
    return found.pop() if len(found) == 1 else None


def checkpoint_files(directory: str | os.PathLike, variant: str | None = None, loading: bool = False) -> list[str]:
    """The safetensors files of a saved model directory: model.safetensors when it is there, else the files its
    shard index names, the rule transformers' `from_pretrained` follows, so that every reader of a checkpoint
    (loading, `dkm-hf inspect`) sees the same files; `variant`: those of `save_pretrained(variant=...)`. Each must be
    a regular file inside the directory; nothing is opened before that is known (a FIFO would block the reader
    forever). `loading`: a shard index must have the "metadata" object transformers reads."""
    directory = Path(directory)
    single_name, index_name = variant_name(SINGLE_NAME, variant), variant_name(INDEX_NAME, variant)
    index = directory / index_name
    if (directory / single_name).is_file():
        files = {single_name: str(directory / single_name)}
    elif index.is_file():
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
            weight_map = content["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise PalettizedCheckpointError(
                f"{index.name}: not a valid shard index (a JSON object with a 'weight_map' of tensor -> file): {err!r}"
            ) from None
        bad = next((n for n in names if not isinstance(n, str) or not n or "\0" in n), None)
        if bad is not None:
            raise PalettizedCheckpointError(f"{index.name}: weight_map values must be file names, got {bad!r}")
        if loading and not isinstance(content.get("metadata"), dict):  # transformers reads it (a bare KeyError)
            raise PalettizedCheckpointError(f"{index.name}: no 'metadata' object beside its weight_map")
        files = {f"{index.name}: weight_map entry {n!r}": str(directory / n) for n in names}
    else:
        raise PalettizedCheckpointError(f"{directory}: no {single_name} or {index_name}")
    check_inside(directory, files.values())
    for where, file in files.items():
        try:
            mode = os.stat(file).st_mode
        except OSError as err:
            raise PalettizedCheckpointError(f"{where}: cannot read {file} ({err.strerror or err})") from None
        if not stat.S_ISREG(mode):
            raise PalettizedCheckpointError(f"{where}: {file} is not a regular file; refusing to open it")
    return list(files.values())


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor's bytes, read at the offsets its (already checked) header entry gives."""
    dtype = TORCH_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    try:
        with open(entry.file, "rb") as f:
            f.seek(entry.data_start + entry.begin)
            data = bytearray(f.read(entry.nbytes))
    except OSError as err:
        raise PalettizedCheckpointError(f"{os.path.basename(entry.file)}: cannot read the file ({err})") from None
    if len(data) != entry.nbytes:
        raise PalettizedCheckpointError(
            f"{os.path.basename(entry.file)}: tensor {entry.name!r} ends past the end of the file (truncated)"
        )
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)
