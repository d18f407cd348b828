"""What a dkm_hf checkpoint must hold, checked before its weights load (headers only) and after (values).

Before: config.json's `quantization_config` and the safetensors metadata must agree on the format; a palettized
checkpoint must store exactly the LUT / packed indices / scale of every recorded module, with the dtypes and shapes
its `Layout` implies; a training checkpoint must carry the centroids of every DKM module (a dense checkpoint whose
config.json declares DKM carries none: its centroids are initialised from the weights).
After: LUTs, scales and centroids are finite, the padding bits after the last packed index are zero, and every
palettized tensor matches the CRC-32 its file's metadata records. Since format version 2 every palettized tensor must
have one, and it covers the tensor's dtype and shape as well as its bytes; version 1 files may lack them (files
written before checksums existed) and their checksums cover the bytes only.
Saving runs the same value checks first, so that no checkpoint is written that its own loader would refuse.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Callable

import torch
from torch import nn

from ..config import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, CheckpointRecord
from ..errors import PalettizedCheckpointError
from ..nn.dkm import DKMMixin
from ..nn.layout import LUT_DTYPES, Layout
from ..nn.palettized import PalettizedMixin
from ..nn.weights import buffer_name
from ..ops.packing import unpack_indices
from .safetensors_files import FLOAT_DTYPES, SAVE_ID_KEY, NameTable, SafetensorsHeader, TensorEntry

FORMAT_KEY, VERSION_KEY, CHECKSUM_PREFIX = "dkm_format", "dkm_format_version", "dkm_crc32:"
LUT_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
assert set(LUT_SAFETENSORS_DTYPES) == set(LUT_DTYPES)


def find_tensor(tensors: NameTable | dict[str, TensorEntry], key: str) -> TensorEntry | None:
    """The entry for `key`, also when the checkpoint was saved with or without the model's base prefix."""
    return (tensors if isinstance(tensors, NameTable) else NameTable(tensors)).find(key)


def state_key(tensors: dict[str, TensorEntry], name: str, kind: str) -> str:
    """The file key of buffer `kind` ("lut", "indices", "scale", "centroids") of weight `name`: `<name>.weight_lut`
    for a module's `weight`, `<module>.<param>_lut` (= `<name>_lut`) for another parameter (see nn.weights)."""
    weight_key = f"{name}.{buffer_name('weight', kind)}"
    other = f"{name}_{kind}"
    if find_tensor(tensors, weight_key) is None and find_tensor(tensors, other) is not None:
        return other
    return weight_key


def is_palettized_key(key: str) -> bool:
    """Whether a file key looks like a palettized buffer (of a module's weight, or an `*_lut` of another parameter)."""
    last = key.rsplit(".", 1)[-1]
    return last in ("weight_lut", "weight_indices", "weight_scale") or last.endswith("_lut")


def checksum(tensor: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    """CRC-32 (8 hex digits) of a tensor's dtype, shape and bytes; of its bytes only in format version 1.

    ~1 GB/s, so checking a 4-bit 135M-weight model costs ~70 ms. Covering the dtype and shape means that the same
    bytes relabelled (F16 -> BF16) or reshaped no longer match."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    if version == 1:
        return f"{zlib.crc32(data):08x}"
    layout = f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}".encode()
    return f"{zlib.crc32(data, zlib.crc32(layout)):08x}"


def new_save_id() -> str:
    return uuid.uuid4().hex


def stored_buffers(model: nn.Module):
    """(state-dict key, tensor) of every palettized buffer a checkpoint stores (tied weights' once, at their owner):
    what the checksums cover."""
    for module_name, module in model.named_modules():
        if not isinstance(module, PalettizedMixin):
            continue
        for weight in module.palettized_weights.values():
            if weight.tied_source is not None:
                continue
            for buffer in weight.buffer_names():
                tensor = module._buffers.get(buffer)
                if tensor is not None:
                    yield (f"{module_name}.{buffer}" if module_name else buffer), tensor


def save_metadata(model: nn.Module, record: CheckpointRecord, state_dict: dict | None = None) -> dict[str, str]:
    """The safetensors metadata of a checkpoint being saved: its format, its save id and a checksum per palettized
    tensor. The values are checked first (finite, zero padding): a save its loader would refuse fails here.
    `state_dict`: what is written instead of the model's own (`save_pretrained(state_dict=...)`); the checksums are
    those of its tensors, each palettized buffer must be in it as the model holds it (dtype, shape) and finite."""
    check_values(model, saving=True)
    metadata = {FORMAT_KEY: record.format, VERSION_KEY: str(record.format_version)}
    if record.save_id is not None:
        metadata[SAVE_ID_KEY] = record.save_id
    for key, tensor in stored_buffers(model):
        if state_dict is not None:
            tensor = _given(state_dict, key, tensor)
        metadata[f"{CHECKSUM_PREFIX}{key}"] = checksum(tensor)
    return metadata


def _given(state_dict: dict, key: str, own: torch.Tensor) -> torch.Tensor:
    value = state_dict.get(key)
    where = f"save_pretrained(state_dict=...): {key}"
    if not isinstance(value, torch.Tensor):
        raise PalettizedCheckpointError(
            f"{where} is missing: a palettized checkpoint stores every LUT and packed indices of the model; nothing "
            "was saved"
        )
    if value.dtype != own.dtype or value.shape != own.shape:
        raise PalettizedCheckpointError(
            f"{where} is {value.dtype} {list(value.shape)}, the model's {own.dtype} {list(own.shape)} (what "
            "config.json records for it); nothing was saved"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise PalettizedCheckpointError(f"{where} has NaN or infinite values; nothing was saved")
    return value


# -- before loading ---------------------------------------------------------------------------------------------------
def check_format(header: SafetensorsHeader, record: CheckpointRecord) -> None:
    """config.json and the files must describe the same kind of checkpoint."""
    written = header.metadata.get(FORMAT_KEY)
    if written is not None and written != record.format:
        raise PalettizedCheckpointError(
            f"config.json's quantization_config says format={record.format!r} but the safetensors files were written "
            f"as {FORMAT_KEY}={written!r}; the config does not belong to these weights (restore its 'format')"
        )
    version = header.metadata.get(VERSION_KEY)
    if record.format == "palettized" and version is None:
        raise PalettizedCheckpointError(
            f"no `{VERSION_KEY}` in the safetensors metadata; these files were not written by dkm_hf's "
            "save_pretrained as a palettized checkpoint"
        )
    if version is not None and version not in map(str, READABLE_FORMAT_VERSIONS):
        readable = " and ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise PalettizedCheckpointError(
            f"safetensors metadata {VERSION_KEY}={version!r}: this dkm_hf reads versions {readable} only"
        )
    if version is not None and version != str(record.format_version):
        raise PalettizedCheckpointError(
            f"config.json's quantization_config has format_version {record.format_version} (the current format where "
            f"it gives none) but the safetensors files were written as {VERSION_KEY}={version!r}; dkm_hf writes the "
            "two alike, so the config or the files were edited (a hand-written config.json of a version 1 checkpoint "
            'needs "format_version": 1)'
        )


def check_save_id(header: SafetensorsHeader, record: CheckpointRecord) -> None:
    """config.json and the weight files must come from the same save (`read_headers` already checked that the files
    agree with each other): an in-place save interrupted between two files leaves a mix that must not load."""
    written = header.metadata.get(SAVE_ID_KEY)
    if written != record.save_id and header.tensors and FORMAT_KEY not in header.metadata:
        raise PalettizedCheckpointError(
            f"config.json's quantization_config declares a dkm_hf {record.format} checkpoint, but the weight files "
            "carry no dkm_hf metadata: dkm_hf did not write them (a model built with from_config from a dkm_hf "
            "config and saved?). Load them without that quantization_config"
        )
    if written != record.save_id:
        files = sorted({os.path.basename(e.file) for e in header.tensors.values()})
        raise PalettizedCheckpointError(
            f"{', '.join(files[:3]) or 'the weight files'}: written by save {written!r}, but config.json's "
            f"quantization_config.save_id is {record.save_id!r}; the directory mixes files of two checkpoints (an "
            "interrupted save, an older model.safetensors beside newer shards: transformers reads the single file "
            "first, a save of another variant into the directory since: its config.json records the last dkm_hf "
            "save, or a save into it while this load read it: load again once it has finished). Remove the older "
            "weight files, save the model again, or restore the matching config.json"
        )
    if written is None and header.metadata.get(VERSION_KEY) == str(FORMAT_VERSION):
        raise PalettizedCheckpointError(
            f"no `{SAVE_ID_KEY}` in the safetensors metadata of a format {header.metadata[VERSION_KEY]} checkpoint; "
            "these files were not written whole by dkm_hf's save_pretrained"
        )


def guess_transposed(tensors: NameTable, name: str, record: dict) -> bool:
    """Without the model, whether a 2-D weight is stored (in, out) as transformers' Conv1D does: its bias then has
    length `out` = shape[1] (Conv1D always has a bias)."""
    shape = record.get("shape") if isinstance(record, dict) else None
    bias = tensors.find(name + ".bias")
    if not (isinstance(shape, list) and len(shape) == 2 and bias is not None and len(bias.shape) == 1):
        return False
    return bias.shape[0] == shape[1] != shape[0]


def check_palettized_headers(
    header: SafetensorsHeader,
    layouts: dict[str, Layout],
    lut_dtype: str,
    model: nn.Module | None = None,
    ignore_mismatched_sizes: bool = False,
    left_out: tuple[str, ...] = (),
) -> None:
    """Every recorded module stores exactly its LUT, packed indices and scale, with the dtypes and shapes its layout
    implies; no other palettized buffer and no dense weight of a palettized module is stored. With the meta-device
    model at hand, every other tensor's shape and kind is checked too. `left_out`: recorded modules the model does not
    have, whose tensors stay unexpected keys."""
    tensors = header.tensors
    lut = LUT_SAFETENSORS_DTYPES[lut_dtype]
    claimed: set[str] = set()
    for name, layout in layouts.items():
        if layout.tied_to is not None:
            continue
        dense = find_tensor(tensors, f"{name}.weight") or tensors.get(name)
        if dense is not None:
            raise PalettizedCheckpointError(
                f"{dense.name}: palettized module {name!r} must store its LUT and packed indices, not a dense weight"
            )
        keys = {kind: state_key(tensors, name, kind) for kind in ("lut", "indices", "scale")}
        expected = {keys["lut"]: (lut, layout.lut_shape), keys["indices"]: ("U8", (layout.packed_bytes,))}
        scale = find_tensor(tensors, keys["scale"])
        if layout.per_channel_scale:
            expected[keys["scale"]] = (lut, layout.scale_shape)
        elif scale is not None:
            raise PalettizedCheckpointError(
                f"{scale.name}: module {name!r} has per_channel_scale=False in config.json but the file stores a scale"
            )
        for key, (dtype, shape) in expected.items():
            entry = find_tensor(tensors, key)
            if entry is None:
                raise PalettizedCheckpointError(f"{key}: missing from the checkpoint files")
            claimed.add(entry.name)
            if entry.dtype != dtype:
                raise PalettizedCheckpointError(
                    f"{entry.name}: dtype {entry.dtype}, expected {dtype} (lut_dtype={lut_dtype!r})"
                    if dtype != "U8"
                    else f"{entry.name}: dtype {entry.dtype}, packed indices must be U8 (uint8)"
                )
            if entry.shape != tuple(shape):
                raise PalettizedCheckpointError(
                    f"{entry.name}: shape {list(entry.shape)}, expected {list(shape)} for bits={layout.bits}, "
                    f"cluster_dim={layout.cluster_dim}, groups={layout.groups}, weight shape {list(layout.shape)}"
                )
    skipped = tuple(f"{m}." for m in left_out)
    for name in tensors:
        if is_palettized_key(name) and name not in claimed and not name.startswith(skipped):
            raise PalettizedCheckpointError(
                f"{name}: a palettized buffer of a module that config.json does not list as palettized"
            )
    if model is not None:
        _check_unclustered(tensors, claimed, model, ignore_mismatched_sizes)


def _check_unclustered(tensors: NameTable, claimed: set[str], model: nn.Module, mismatched: bool = False) -> None:
    """Unclustered tensors as the model expects them; with from_pretrained's ignore_mismatched_sizes=True, one of
    another shape is transformers' to re-initialise (a new head)."""
    expected = model.state_dict()
    for name, entry in tensors.items():
        if name in claimed or name not in expected:
            continue
        want = expected[name]
        if entry.shape != tuple(want.shape) and not mismatched:
            raise PalettizedCheckpointError(
                f"{name}: shape {list(entry.shape)} in the checkpoint, the model expects {list(want.shape)}"
            )
        if (entry.dtype in FLOAT_DTYPES) != want.is_floating_point():
            raise PalettizedCheckpointError(
                f"{name}: dtype {entry.dtype} in the checkpoint, the model has {want.dtype}"
            )


def carries_training_state(
    header: SafetensorsHeader, layouts: dict[str, Layout], in_model: Callable[[str], bool] = lambda name: True
) -> bool:
    """Whether a `format: train` checkpoint holds the DKM state of these modules (True) or is a dense checkpoint
    whose config.json declares DKM (False: initialise from the weights). Partial state is an error naming the
    modules that lack it, and so are centroids of a weight of the model (`in_model(weight name)`) that is not among
    `layouts` (a config edited since the save: that weight would load dense)."""
    owners = {n: lay for n, lay in layouts.items() if lay.tied_to is None}
    tensors = header.tensors
    wanted = {state_key(tensors, n, "centroids"): lay.lut_shape for n, lay in owners.items()}
    wanted |= {state_key(tensors, n, "scale"): lay.scale_shape for n, lay in owners.items() if lay.per_channel_scale}
    found = {key: find_tensor(header.tensors, key) for key in wanted}
    train = header.metadata.get(FORMAT_KEY) == "train"
    known = {entry.name for entry in found.values() if entry is not None}
    stray = sorted(n for n in tensors.keys() if n.endswith("centroids") and n not in known and in_model(n[:-10]))
    if train and stray:
        raise PalettizedCheckpointError(
            f"training checkpoint with the centroids of {len(stray)} weight(s) that config.json's "
            f"quantization_config does not cluster, e.g. {stray[:3]} (were its target_modules / "
            "modules_to_not_convert / overrides edited?); they would load as dense layers. Restore the config it was "
            "saved with"
        )
    unscaled = [n for n, lay in owners.items() if not lay.per_channel_scale]
    scales = [e.name for n in unscaled if (e := find_tensor(tensors, state_key(tensors, n, "scale"))) is not None]
    if train and scales:
        raise PalettizedCheckpointError(
            f"training checkpoint with per-channel scales ({scales[:3]}) for weights clustered without them: it was "
            "trained with per_channel_scale=True"
        )
    if not wanted:  # a config that selects no weight (warned when it was applied): nothing to look for
        return train
    if not any(found.values()):
        if train:
            raise PalettizedCheckpointError(
                "these files were written by dkm_hf as a training checkpoint but hold no `*.centroids`; they are "
                "damaged or were re-saved without the DKM state"
            )
        return False
    missing = sorted(key for key, entry in found.items() if entry is None)
    if missing:
        raise PalettizedCheckpointError(
            f"training checkpoint without the DKM state of {len(missing)} tensor(s), e.g. {missing[:4]}: a training "
            "checkpoint must carry every clustered module's centroids (and scales)"
        )
    for key, entry in found.items():
        if entry.shape != tuple(wanted[key]) or entry.dtype not in FLOAT_DTYPES:
            raise PalettizedCheckpointError(
                f"{entry.name}: {entry.dtype} of shape {list(entry.shape)}, expected a float tensor of shape "
                f"{list(wanted[key])}"
            )
    return True


# -- after loading -------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_values(model: nn.Module, saving: bool = False) -> None:
    """Finite centroids, LUTs and scales, zero padding bits: what loading requires, checked again before saving."""
    for name, module in model.named_modules():
        if isinstance(module, DKMMixin):
            for weight in module.dkm_weights.values():
                if weight.tied_source is None and weight.has_state:
                    # loaded with its centroids, the weight itself skips k-means' check (before a save, the callback's)
                    names = weight.state_names() if saving else (*weight.state_names(), weight.param)
                    _check_finite(name, module, names, saving)
        if isinstance(module, PalettizedMixin):
            for weight in module.palettized_weights.values():
                if weight.tied_source is None:
                    _check_finite(name, module, (weight.buffer("lut"), weight.buffer("scale")), saving)
                    _check_padding(name, weight)


@torch.no_grad()
def check_loaded(model: nn.Module, metadata: dict[str, str], prefix: str | None = None) -> None:
    """After loading: `check_values`, and the checksums recorded in the files' metadata (required since version 2);
    `prefix`: the model's base prefix, the only part in which a saved name may differ from the model's."""
    check_values(model)
    version = int(metadata.get(VERSION_KEY, "1"))
    required = version >= 2 or SAVE_ID_KEY in metadata
    sums = {k[len(CHECKSUM_PREFIX) :]: v for k, v in metadata.items() if k.startswith(CHECKSUM_PREFIX)}
    checksums = NameTable(sums, prefix)
    for key, tensor in stored_buffers(model):
        recorded = checksums.find(key)
        if recorded is None and required:
            raise PalettizedCheckpointError(
                f"{key}: no `{CHECKSUM_PREFIX}{key}` in the safetensors metadata; files written with a save id carry "
                "a checksum for every palettized tensor (the file was altered)"
            )
        if recorded is not None and checksum(tensor, version) != recorded:
            raise PalettizedCheckpointError(
                f"{key}: checksum {checksum(tensor, version)} does not match the {recorded} recorded when it was "
                "saved (the file is damaged or was altered, or a save into the directory replaced it while this "
                "load read it: load again once that save has finished)"
            )


def _check_finite(name: str, module: nn.Module, tensors: tuple[str, ...], saving: bool = False) -> None:
    """Each of the module's buffers or parameters `tensors` (names) is finite."""
    for buffer in tensors:
        value = module._buffers[buffer] if buffer in module._buffers else module._parameters.get(buffer)
        if value is not None and not value.is_meta and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            message = f"{name}.{buffer}: {bad} value(s) are NaN or infinite"
            if saving:
                message += "; nothing was saved, the checkpoint would not load"
                if value.dtype == torch.float16 and not bool(value.isnan().any()):  # inf: an overflow, not a NaN
                    message += (
                        " (float16 holds magnitudes up to 65504: palettize with DKMConfig(lut_dtype='float32') or "
                        "'bfloat16' for larger weights)"
                    )
            raise PalettizedCheckpointError(message)


def _check_padding(name: str, module) -> None:
    """Every b-bit field is < 2**b by construction, so the index range cannot be violated; the padding bits of the
    last 8-index block are the part of the bytes the format pins down, and a flipped one means a damaged file."""
    layout = module.layout
    used = layout.vectors % 8
    if used:
        tail = unpack_indices(module.weight_indices[-layout.bits :], layout.bits, 8)[used:]
        if bool(tail.any()):
            raise PalettizedCheckpointError(
                f"{name}.{module.buffer('indices')}: non-zero padding bits after index {layout.vectors - 1} "
                "(damaged file)"
            )
