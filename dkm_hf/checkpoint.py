"""Deprecated: `dkm_hf.checkpoint` became `dkm_hf.errors` (the error) and `dkm_hf.integrations` (the checks)."""

from __future__ import annotations

import warnings

from .errors import PalettizedCheckpointError
from .integrations.safetensors_files import read_header
from .integrations.summary import summarize

warnings.warn(
    "dkm_hf.checkpoint is deprecated: use dkm_hf.PalettizedCheckpointError and dkm_hf.integrations.summary.summarize",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["PalettizedCheckpointError", "read_header", "summarize"]
