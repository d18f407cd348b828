"""Validation of palettized checkpoints (filled in by the checkpoint work)."""

from __future__ import annotations


def check_palettized_files(files, config) -> None:
    return None


def check_loaded_palettized(model, config) -> None:
    return None


def install() -> None:
    """Hooks dkm_hf adds to transformers' saving (atomic palettized saves, model card)."""
    return None
