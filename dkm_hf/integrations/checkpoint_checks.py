"""What a dkm_hf checkpoint must hold, checked before its weights load (headers only) and after (values).

Before: config.json's `quantization_config` and the safetensors metadata must agree on the format; a palettized
checkpoint must store exactly the LUT / packed indices / scale of every recorded module, with the dtypes and shapes
its `Layout` implies; a training checkpoint must carry the centroids of every DKM module (a dense checkpoint whose
config.json declares DKM carries none: its centroids are initialised from the weights).
After: LUTs, scales and centroids are finite, the padding bits after the last packed index are zero, and every
palettized tensor matches the CRC-32 its file's metadata records (files written before checksums existed have none).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..config import FORMAT_VERSION, CheckpointRecord
from ..errors import PalettizedCheckpointError
from ..nn.dkm import DKMMixin
from ..nn.layout import LUT_DTYPES, Layout
from ..nn.palettized import BUFFERS, PalettizedMixin
from ..ops.packing import unpack_indices
from .safetensors_files import FLOAT_DTYPES, NameTable, SafetensorsHeader

FORMAT_KEY, VERSION_KEY, CHECKSUM_PREFIX = "dkm_format", "dkm_format_version", "dkm_crc32:"
LUT_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
assert set(LUT_SAFETENSORS_DTYPES) == set(LUT_DTYPES)


def checksum(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (8 hex digits): ~1 GB/s, so checking a 4-bit 135M-weight model costs ~70 ms."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def save_metadata(model: nn.Module, record: CheckpointRecord) -> dict[str, str]:
    """The safetensors metadata of a checkpoint being saved: its format, and a checksum per palettized tensor."""
    metadata = {FORMAT_KEY: record.format, VERSION_KEY: str(record.format_version)}
    for name, module in model.named_modules():
        if isinstance(module, PalettizedMixin) and module.tied_source is None:
            for buffer in BUFFERS:
                if module._buffers.get(buffer) is not None:
                    metadata[f"{CHECKSUM_PREFIX}{name}.{buffer}"] = checksum(module._buffers[buffer])
    return metadata


# -- before loading ---------------------------------------------------------------------------------------------------
def check_format(header: SafetensorsHeader, record: CheckpointRecord) -> None:
    """config.json and the files must describe the same kind of checkpoint."""
    written = header.metadata.get(FORMAT_KEY)
    if written is not None and written != record.format:
        raise PalettizedCheckpointError(
            f"config.json's quantization_config says format={record.format!r} but the safetensors files were written "
            f"as {FORMAT_KEY}={written!r}; the config does not belong to these weights (restore its 'format')"
        )
    if record.format == "palettized":
        version = header.metadata.get(VERSION_KEY)
        if version is None:
            raise PalettizedCheckpointError(
                f"no `{VERSION_KEY}` in the safetensors metadata; these files were not written by dkm_hf's "
                "save_pretrained as a palettized checkpoint"
            )
        if version != str(FORMAT_VERSION):
            raise PalettizedCheckpointError(
                f"safetensors metadata {VERSION_KEY}={version!r}: this dkm_hf reads version {FORMAT_VERSION} only"
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
    header: SafetensorsHeader, layouts: dict[str, Layout], lut_dtype: str, model: nn.Module | None = None
) -> None:
    """Every recorded module stores exactly its LUT, packed indices and scale, with the dtypes and shapes its layout
    implies; no other palettized buffer and no dense weight of a palettized module is stored. With the meta-device
    model at hand, every other tensor's shape and kind is checked too."""
    tensors = header.tensors
    lut = LUT_SAFETENSORS_DTYPES[lut_dtype]
    claimed: set[str] = set()
    for name, layout in layouts.items():
        if layout.tied_to is not None:
            continue
        dense = tensors.find(f"{name}.weight")
        if dense is not None:
            raise PalettizedCheckpointError(
                f"{dense.name}: palettized module {name!r} must store weight_lut/weight_indices, not a dense weight"
            )
        expected = {"weight_lut": (lut, layout.lut_shape), "weight_indices": ("U8", (layout.packed_bytes,))}
        scale = tensors.find(f"{name}.weight_scale")
        if layout.per_channel_scale:
            expected["weight_scale"] = (lut, layout.scale_shape)
        elif scale is not None:
            raise PalettizedCheckpointError(
                f"{scale.name}: module {name!r} has per_channel_scale=False in config.json but the file stores a scale"
            )
        for suffix, (dtype, shape) in expected.items():
            entry = tensors.find(f"{name}.{suffix}")
            if entry is None:
                raise PalettizedCheckpointError(f"{name}.{suffix}: missing from the checkpoint files")
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
    for name in tensors:
        if name.rsplit(".", 1)[-1] in BUFFERS and name not in claimed:
            raise PalettizedCheckpointError(
                f"{name}: a palettized buffer of a module that config.json does not list as palettized"
            )
    if model is not None:
        _check_unclustered(tensors, claimed, model)


def _check_unclustered(tensors: NameTable, claimed: set[str], model: nn.Module) -> None:
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


def carries_training_state(header: SafetensorsHeader, layouts: dict[str, Layout]) -> bool:
    """Whether a `format: train` checkpoint holds the DKM state of these modules (True) or is a dense checkpoint
    whose config.json declares DKM (False: initialise from the weights). Partial state is an error naming the
    modules that lack it."""
    owners = {n: lay for n, lay in layouts.items() if lay.tied_to is None}
    wanted = {f"{n}.centroids": lay.lut_shape for n, lay in owners.items()}
    wanted |= {f"{n}.weight_scale": lay.scale_shape for n, lay in owners.items() if lay.per_channel_scale}
    found = {key: header.tensors.find(key) for key in wanted}
    if not any(found.values()):
        if header.metadata.get(FORMAT_KEY) == "train":
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
def check_loaded(model: nn.Module, metadata: dict[str, str]) -> None:
    """After loading: finite values, zero padding bits, and the checksums recorded in the files' metadata."""
    checksums = NameTable({k[len(CHECKSUM_PREFIX) :]: v for k, v in metadata.items() if k.startswith(CHECKSUM_PREFIX)})
    for name, module in model.named_modules():
        if isinstance(module, DKMMixin) and "centroids" in module._buffers:
            _check_finite(name, module, ("centroids", "weight_scale"))
        if not isinstance(module, PalettizedMixin) or module.tied_source is not None:
            continue
        _check_finite(name, module, ("weight_lut", "weight_scale"))
        _check_padding(name, module)
        for buffer in BUFFERS:
            tensor = module._buffers.get(buffer)
            recorded = checksums.find(f"{name}.{buffer}")
            if tensor is not None and recorded is not None and checksum(tensor) != recorded:
                raise PalettizedCheckpointError(
                    f"{name}.{buffer}: checksum {checksum(tensor)} does not match the {recorded} recorded when it was "
                    "saved (the file is damaged or was altered)"
                )


def _check_finite(name: str, module: nn.Module, buffers: tuple[str, ...]) -> None:
    for buffer in buffers:
        value = module._buffers.get(buffer)
        if value is not None and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise PalettizedCheckpointError(f"{name}.{buffer}: {bad} value(s) are NaN or infinite")


def _check_padding(name: str, module: PalettizedMixin) -> None:
    """Every b-bit field is < 2**b by construction, so the index range cannot be violated; the padding bits of the
    last 8-index block are the part of the bytes the format pins down, and a flipped one means a damaged file."""
    layout = module.layout
    used = layout.vectors % 8
    if used:
        tail = unpack_indices(module.weight_indices[-layout.bits :], layout.bits, 8)[used:]
        if bool(tail.any()):
            raise PalettizedCheckpointError(
                f"{name}.weight_indices: non-zero padding bits after index {layout.vectors - 1} (damaged file)"
            )
