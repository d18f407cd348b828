"""Size accounting of a saved palettized checkpoint, from config.json and the safetensors headers (no weights read):
what the `dkm-hf inspect` table and the model card print."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CheckpointRecord
from ..errors import PalettizedCheckpointError
from ..nn.layout import Layout, layouts_from_records
from .checkpoint_checks import find_tensor, guess_transposed, state_key
from .safetensors_files import FLOAT_DTYPES, NameTable, TensorEntry, checkpoint_files, read_headers


@dataclass
class CheckpointSummary:
    """Bytes of a palettized checkpoint, per clustered module and in total, against dense fp32 / fp16 checkpoints."""

    layouts: dict[str, Layout]
    tensors: NameTable
    metadata: dict[str, str]
    config: dict[str, Any]
    files: list[str]

    def stored(self, name: str) -> dict[str, TensorEntry]:
        """The palettized tensors weight `name` stores on disk, by kind ("weight_lut", "weight_indices",
        "weight_scale"; {} for a tied weight)."""
        entries = {
            f"weight_{kind}": find_tensor(self.tensors, state_key(self.tensors, name, kind))
            for kind in ("lut", "indices", "scale")
        }
        return {buffer: entry for buffer, entry in entries.items() if entry is not None}

    def bytes_on_disk(self, name: str) -> int:
        return sum(entry.nbytes for entry in self.stored(name).values())

    def bound_bytes(self, name: str) -> float:
        """Information content: N*b/(8d) index bytes (no padding) plus the LUT and scale bytes."""
        layout, stored = self.layouts[name], self.stored(name)
        if layout.tied_to is not None:
            return 0.0
        packed = stored["weight_indices"].nbytes if "weight_indices" in stored else 0
        return layout.numel * layout.bits_per_weight / 8 + self.bytes_on_disk(name) - packed

    @property
    def owners(self) -> dict[str, Layout]:
        """The clustered modules that store their own LUT (tied modules left out)."""
        return {name: layout for name, layout in self.layouts.items() if layout.tied_to is None}

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def clustered_bytes(self) -> int:
        return sum(self.bytes_on_disk(name) for name in self.owners)

    def dense_bytes(self, float_bytes: int) -> int:
        """The model's size with every float tensor (clustered weights decoded) stored at `float_bytes` per value."""
        clustered = {entry.name for name in self.owners for entry in self.stored(name).values()}
        total = sum(layout.numel * float_bytes for layout in self.owners.values())
        for name, entry in self.tensors.items():
            if name not in clustered:
                total += entry.numel * float_bytes if entry.dtype in FLOAT_DTYPES else entry.nbytes
        return total


def summarize(directory: str | os.PathLike, variant: str | None = None) -> CheckpointSummary:
    """Per-module layout and bytes of a saved palettized checkpoint (`variant`: of `save_pretrained(variant=...)`)."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PalettizedCheckpointError(f"{path}: cannot read a JSON config ({err})") from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "dkm" or quant.get("format") != "palettized":
        raise PalettizedCheckpointError(f"{directory}: config.json does not describe a dkm_hf palettized checkpoint")
    try:  # a format this dkm_hf cannot read (a newer one) is refused as from_pretrained refuses it
        CheckpointRecord(**{key: quant[key] for key in CheckpointRecord.KEYS if key in quant})
    except (ValueError, TypeError) as err:
        raise PalettizedCheckpointError(f"{path}: {err}") from None
    files = checkpoint_files(directory, variant)
    header = read_headers(files)
    records = quant.get("modules", {})
    layouts = layouts_from_records(records, lambda name: guess_transposed(header.tensors, name, records.get(name)))
    return CheckpointSummary(dict(sorted(layouts.items())), header.tensors, header.metadata, config, files)
