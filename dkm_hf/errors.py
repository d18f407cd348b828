"""The exceptions dkm_hf raises on purpose. Every layer may import this module; it imports nothing."""

from __future__ import annotations


class PalettizedCheckpointError(ValueError):
    """A checkpoint that dkm_hf refuses to read; the message names the file, tensor or module and the problem."""
