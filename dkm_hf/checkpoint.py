"""Palettized checkpoints on disk: validation before and after loading, and size accounting.

Loading never unpickles: a palettized checkpoint is safetensors only. Its JSON headers are read and checked against
`quantization_config.modules` before a single weight is loaded, so a damaged or tampered file fails with a
`PalettizedCheckpointError` naming the tensor, never with a shape error deep inside transformers or with garbage
weights. What a header cannot show (NaN/inf in a LUT, non-zero padding bits after the last packed index) is checked
once the buffers are loaded. Changing LUT or index bytes to other valid values gives other valid weights: no format
without checksums can tell those apart.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FORMAT_VERSION, DKMConfig
from .packing import packed_size, unpack_indices
from .palettized import palettized_modules

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
LUT_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
PALETTIZED_SUFFIXES = ("weight_lut", "weight_indices", "weight_scale")


class PalettizedCheckpointError(ValueError):
    """A palettized checkpoint that dkm_hf refuses to load; the message names the file or tensor and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes are, without reading them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of one safetensors file (8-byte little-endian length, then JSON), reading no data.

    Offsets must tile the data section exactly, as safetensors itself requires, so a truncated or padded file is
    reported here with the byte counts instead of failing later.
    """
    path = os.fspath(path)
    where = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise PalettizedCheckpointError(f"{where}: {size} bytes, too short for a safetensors header (truncated)")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise PalettizedCheckpointError(
                f"{where}: header length {length} does not fit in the {size}-byte file (truncated or not safetensors)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PalettizedCheckpointError(f"{where}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise PalettizedCheckpointError(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PalettizedCheckpointError(f"{where}: __metadata__ must map strings to strings, got {metadata!r}")
    tensors = {name: _entry(where, path, name, info) for name, info in header.items()}
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


def _entry(where: str, path: str, name: str, info: Any) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has a malformed header entry {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise PalettizedCheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != expected:
        raise PalettizedCheckpointError(
            f"{where}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its data_offsets "
            f"{offsets} span {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end, path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_headers(files: Iterable[str | os.PathLike]) -> SafetensorsHeader:
    """The headers of all shards of one checkpoint, merged; a tensor stored in two shards is an error."""
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for path in files:
        header = read_header(path)
        for name, entry in header.tensors.items():
            if name in tensors:
                raise PalettizedCheckpointError(
                    f"tensor {name!r} is stored twice: in {os.path.basename(tensors[name].file)} and "
                    f"{os.path.basename(entry.file)}"
                )
            tensors[name] = entry
        for key, value in header.metadata.items():
            if key.startswith("dkm_") and metadata.setdefault(key, value) != value:
                raise PalettizedCheckpointError(
                    f"{os.path.basename(path)}: metadata {key}={value!r} differs from the other shards' "
                    f"{metadata[key]!r}"
                )
        if "dkm_format_version" not in header.metadata:
            raise PalettizedCheckpointError(
                f"{os.path.basename(path)}: no `dkm_format_version` in the safetensors metadata; this file was not "
                "written by dkm_hf's save_pretrained"
            )
    return SafetensorsHeader(tensors, metadata)


# -- layout of one palettized module ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleLayout:
    """What config.json records for one palettized module, with the sizes it implies."""

    name: str
    bits: int
    cluster_dim: int
    groups: int
    shape: tuple[int, ...]
    per_channel_scale: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def vectors(self) -> int:
        return self.numel // self.cluster_dim

    @property
    def packed_bytes(self) -> int:
        return packed_size(self.vectors, self.bits)


def module_layout(name: str, record: Any) -> ModuleLayout:
    """Check one `quantization_config.modules` record and return its layout."""
    if not isinstance(record, dict):
        raise PalettizedCheckpointError(f"config.json: palettized module {name!r} has a malformed record {record!r}")
    for key in ("bits", "cluster_dim", "groups"):
        if not _is_count(record.get(key)) or record[key] < 1:
            raise PalettizedCheckpointError(
                f"config.json: palettized module {name!r} needs a positive integer {key!r}, got {record.get(key)!r}"
            )
    shape = record.get("shape")
    if not isinstance(shape, list) or not shape or not all(_is_count(s) and s > 0 for s in shape):
        raise PalettizedCheckpointError(f"config.json: palettized module {name!r} has invalid shape {shape!r}")
    if not isinstance(record.get("per_channel_scale"), bool):
        raise PalettizedCheckpointError(
            f"config.json: palettized module {name!r} needs a bool 'per_channel_scale', "
            f"got {record.get('per_channel_scale')!r}"
        )
    layout = ModuleLayout(
        name, record["bits"], record["cluster_dim"], record["groups"], tuple(shape), record["per_channel_scale"]
    )
    if layout.bits > 8:
        raise PalettizedCheckpointError(f"config.json: palettized module {name!r} has bits={layout.bits}, above 8")
    if layout.numel % (layout.cluster_dim * layout.groups):
        raise PalettizedCheckpointError(
            f"config.json: palettized module {name!r}: {layout.numel} weights do not split into {layout.groups} "
            f"group(s) of {layout.cluster_dim}-vectors"
        )
    return layout


def output_channels(layout: ModuleLayout, tensors: dict[str, TensorEntry], model: nn.Module | None) -> int:
    """The output-channel count of a palettized weight: the length its per-channel scale must have.

    Exact with the model at hand. From the file alone a 2-D weight is ambiguous (transformers' Conv1D stores
    (in, out), nn.Linear (out, in)), and the module's bias settles it: Conv1D always has one, of length `out`.
    """
    if model is not None:
        from transformers.pytorch_utils import Conv1D

        try:
            module = model.get_submodule(layout.name)
        except AttributeError:
            module = None
        if module is not None:
            return layout.shape[1] if isinstance(module, Conv1D) else layout.shape[0]
    bias = find_tensor(tensors, layout.name + ".bias")
    if len(layout.shape) == 2 and bias is not None and bias.shape == (layout.shape[1],):
        return layout.shape[1]
    return layout.shape[0]


def find_tensor(tensors: dict[str, TensorEntry], key: str) -> TensorEntry | None:
    if key in tensors:
        return tensors[key]
    matches = [e for name, e in tensors.items() if name.endswith("." + key) or key.endswith("." + name)]
    return matches[0] if len(matches) == 1 else None


def check_palettized_files(
    files: Iterable[str | os.PathLike], config: DKMConfig, model: nn.Module | None = None
) -> None:
    """Validate the files of a palettized checkpoint against `config.modules` before any weight loads.

    `model` (optional, the meta-device model about to receive the weights) makes the channel count of per-channel
    scales and the shapes of the unclustered tensors exact.
    """
    if config.format != "palettized":
        return
    files = [os.fspath(f) for f in files]
    for path in files:
        if not path.endswith(".safetensors"):
            raise PalettizedCheckpointError(
                f"{os.path.basename(path)}: palettized checkpoints load from safetensors only; dkm_hf never "
                "unpickles (.bin / pickle) weight files. Re-save the model with save_pretrained."
            )
    if not files:
        return
    header = read_headers(files)
    version = header.metadata["dkm_format_version"]
    if version != str(FORMAT_VERSION):
        raise PalettizedCheckpointError(
            f"safetensors metadata dkm_format_version={version!r}: this dkm_hf reads version {FORMAT_VERSION} only"
        )
    if header.metadata.get("dkm_format", "palettized") != "palettized":
        raise PalettizedCheckpointError(
            f"safetensors metadata dkm_format={header.metadata['dkm_format']!r} but config.json says 'palettized'"
        )
    tensors = header.tensors
    lut_dtype = LUT_SAFETENSORS_DTYPES[config.lut_dtype]
    if not isinstance(config.modules, dict):
        raise PalettizedCheckpointError(
            f"config.json: quantization_config.modules must be a dict, got {config.modules!r}"
        )
    claimed: set[str] = set()
    for name, record in config.modules.items():
        if isinstance(record, dict) and set(record) == {"tied_to"}:
            if record["tied_to"] not in config.modules:
                raise PalettizedCheckpointError(
                    f"config.json: module {name!r} is tied to {record['tied_to']!r}, which is not palettized"
                )
            continue
        layout = module_layout(name, record)
        dense = find_tensor(tensors, f"{name}.weight")
        if dense is not None:
            raise PalettizedCheckpointError(
                f"{dense.name}: palettized module {name!r} must store weight_lut/weight_indices, not a dense weight"
            )
        expected = {
            "weight_lut": (lut_dtype, (layout.groups, 2**layout.bits, layout.cluster_dim)),
            "weight_indices": ("U8", (layout.packed_bytes,)),
        }
        scale = find_tensor(tensors, f"{name}.weight_scale")
        channels = output_channels(layout, tensors, model)
        if channels % layout.groups:
            raise PalettizedCheckpointError(
                f"config.json: module {name!r} has groups={layout.groups}, which does not divide its {channels} "
                "output channels"
            )
        if layout.per_channel_scale:
            expected["weight_scale"] = (lut_dtype, (channels, 1))
        elif scale is not None:
            raise PalettizedCheckpointError(
                f"{scale.name}: module {name!r} has per_channel_scale=False in config.json but the file stores a scale"
            )
        for suffix, (dtype, shape) in expected.items():
            entry = find_tensor(tensors, f"{name}.{suffix}")
            if entry is None:
                raise PalettizedCheckpointError(f"{name}.{suffix}: missing from the checkpoint files")
            claimed.add(entry.name)
            if entry.dtype != dtype:
                raise PalettizedCheckpointError(
                    f"{entry.name}: dtype {entry.dtype}, expected {dtype} (lut_dtype={config.lut_dtype!r})"
                    if dtype != "U8"
                    else f"{entry.name}: dtype {entry.dtype}, packed indices must be U8 (uint8)"
                )
            if entry.shape != shape:
                raise PalettizedCheckpointError(
                    f"{entry.name}: shape {list(entry.shape)}, expected {list(shape)} for bits={layout.bits}, "
                    f"cluster_dim={layout.cluster_dim}, groups={layout.groups}, weight shape {list(layout.shape)}"
                )
    for name, entry in tensors.items():
        if name.rsplit(".", 1)[-1] in PALETTIZED_SUFFIXES and name not in claimed:
            raise PalettizedCheckpointError(
                f"{name}: a palettized buffer of a module that config.json does not list as palettized"
            )
    if model is not None:
        _check_unclustered(tensors, claimed, model)


def _check_unclustered(tensors: dict[str, TensorEntry], claimed: set[str], model: nn.Module) -> None:
    expected = model.state_dict()
    for name, entry in tensors.items():
        if name in claimed or name not in expected:
            continue
        want = expected[name]
        if entry.shape != tuple(want.shape):
            raise PalettizedCheckpointError(
                f"{name}: shape {list(entry.shape)} in the checkpoint, the model expects {list(want.shape)}"
            )
        if (entry.dtype in FLOAT_DTYPES) != want.is_floating_point():
            raise PalettizedCheckpointError(
                f"{name}: dtype {entry.dtype} in the checkpoint, the model has {want.dtype}"
            )


@torch.no_grad()
def check_loaded_palettized(model: nn.Module, config: DKMConfig) -> None:
    """After loading: finite LUTs and scales, and zero padding bits after the last index of every packed tensor.

    Every b-bit field is < 2**b by construction, so the index range itself cannot be violated; the padding bits of
    the last 8-index block are the part of the bytes the format pins down, and a flipped one means a damaged file.
    """
    if config.format != "palettized":
        return
    for name, module in palettized_modules(model):
        if module.tied_source is not None:
            continue
        for buffer in ("weight_lut", "weight_scale"):
            value = module._buffers.get(buffer)
            if value is not None and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise PalettizedCheckpointError(f"{name}.{buffer}: {bad} value(s) are NaN or infinite")
        g = module.geometry
        n = g.groups * g.vectors_per_group
        packed = module.weight_indices
        if packed.numel() != packed_size(n, module.bits):
            raise PalettizedCheckpointError(
                f"{name}.weight_indices: {packed.numel()} bytes, expected {packed_size(n, module.bits)}"
            )
        used = n % 8
        if used:
            tail = unpack_indices(packed[-module.bits :], module.bits, 8)[used:]
            if bool(tail.any()):
                raise PalettizedCheckpointError(
                    f"{name}.weight_indices: non-zero padding bits after index {n - 1} (damaged file)"
                )


# -- size accounting ------------------------------------------------------------------------------------------------
@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, ...]
    bits: int | None
    cluster_dim: int | None
    groups: int | None
    per_channel_scale: bool
    bytes_on_disk: int
    tied_to: str | None = None
    packed_bytes: int = 0
    tensor_names: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bound_bytes(self) -> float:
        """Information content: N*b/(8d) index bytes (no padding) plus the LUT and scale bytes."""
        if self.tied_to is not None:
            return 0.0
        return self.numel * self.bits / (8 * self.cluster_dim) + self.bytes_on_disk - self.packed_bytes


@dataclass
class CheckpointSummary:
    """Bytes of a palettized checkpoint against the dense fp32 / fp16 checkpoints of the same model."""

    layers: list[LayerSummary]
    tensors: dict[str, TensorEntry]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def clustered_bytes(self) -> int:
        return sum(layer.bytes_on_disk for layer in self.layers)

    def dense_bytes(self, float_bytes: int) -> int:
        """The model's size with every float tensor (clustered weights decoded) stored at `float_bytes` per value."""
        clustered = {name for layer in self.layers for name in layer.tensor_names}
        total = sum(layer.numel * float_bytes for layer in self.layers if layer.tied_to is None)
        for name, entry in self.tensors.items():
            if name not in clustered:
                total += entry.numel * float_bytes if entry.dtype in FLOAT_DTYPES else entry.nbytes
        return total


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a saved model directory (following the shard index when there is one)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [str(directory / f) for f in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [str(single)]
    raise PalettizedCheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def summarize(directory: str | os.PathLike) -> CheckpointSummary:
    """Per-layer layout and bytes of a saved palettized checkpoint, from config.json and the safetensors headers."""
    config = json.loads((Path(directory) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "dkm" or quant.get("format") != "palettized":
        raise PalettizedCheckpointError(f"{directory}: config.json does not describe a dkm_hf palettized checkpoint")
    files = checkpoint_files(directory)
    tensors = read_headers(files).tensors
    layers = []
    for name, record in sorted(quant.get("modules", {}).items()):
        if "tied_to" in record:
            source = quant["modules"][record["tied_to"]]
            layers.append(LayerSummary(name, tuple(source["shape"]), None, None, None, False, 0, record["tied_to"]))
            continue
        layout = module_layout(name, record)
        entries = [find_tensor(tensors, f"{name}.{s}") for s in PALETTIZED_SUFFIXES]
        layer = LayerSummary(
            name,
            layout.shape,
            layout.bits,
            layout.cluster_dim,
            layout.groups,
            layout.per_channel_scale,
            sum(e.nbytes for e in entries if e is not None),
        )
        layer.packed_bytes = entries[1].nbytes if entries[1] is not None else 0
        layer.tensor_names = tuple(e.name for e in entries if e is not None)
        layers.append(layer)
    return CheckpointSummary(layers, tensors, config, files)


def install() -> None:
    """Hooks dkm_hf adds to transformers' saving: atomic palettized saves with a model card (see `hub`)."""
    from .hub import install_save_hooks

    install_save_hooks()
