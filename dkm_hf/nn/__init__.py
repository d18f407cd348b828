"""Clustered weights: training-time DKM weights and inference-time palettized weights, side by side.

layout.py      `Layout` (how a weight is cut into LUT groups and vectors; its config.json record) and
               `ClusterSettings` (the DKM loop's settings for one weight)
weights.py     what the two forms share: weight names, the generated subclass of the module's own class, dtypes
dkm.py         `DKMWeight` / `DKMMixin`: soft weight in training, hard weight in evaluation
scopes.py      `ParentScope`: a parent that reads its DKM children's weights directly sees the clustered ones
palettized.py  `PalettizedWeight` / `PalettizedMixin`: LUT + packed indices, decoded once or per forward

Neither dkm.py nor palettized.py imports the other; converting between them is `surgery`'s job.
"""

from __future__ import annotations

import warnings

from .dkm import DKMMixin, DKMWeight, dkm_modules
from .layout import ClusterSettings, Layout
from .palettized import PalettizedMixin, PalettizedWeight, palettized_modules
from .weights import base_class, weight_name

__all__ = [
    "ClusterSettings",
    "DKMMixin",
    "DKMWeight",
    "Layout",
    "PalettizedMixin",
    "PalettizedWeight",
    "base_class",
    "dkm_modules",
    "palettized_modules",
    "register_module",
    "weight_name",
]


def register_module(base: type, transposed: bool = False):
    """Deprecated: dkm_hf clusters the parameters of any module (every parameter of two or more dimensions, chosen by
    name), keeping the module's own forward; no registration is needed."""

    def decorator(forward):
        warnings.warn(
            f"dkm_hf.register_module({base.__name__}) is no longer needed: any module's weights are clustered and its "
            "own forward is kept",
            FutureWarning,
            stacklevel=2,
        )
        return forward

    return decorator
