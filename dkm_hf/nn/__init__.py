"""The modules: training-time DKM modules and inference-time palettized modules, side by side.

layout.py      `Layout` (how a weight is cut into LUT groups and vectors; its config.json record) and
               `ClusterSettings` (the DKM loop's settings for one module)
registry.py    the registered module types (Linear, Conv1d/2d/3d, transformers' Conv1D, Embedding) and what the two
               module families share
dkm.py         `DKMMixin`: soft weight in training, hard weight in evaluation
palettized.py  `PalettizedMixin`: LUT + packed indices, decoded once or per forward

Neither dkm.py nor palettized.py imports the other; converting between them is `surgery`'s job.
"""

from .dkm import DKMMixin, dkm_modules
from .layout import ClusterSettings, Layout
from .palettized import PalettizedMixin, palettized_modules
from .registry import functional_forward, module_type, register_module, supported_types

__all__ = [
    "ClusterSettings",
    "DKMMixin",
    "Layout",
    "PalettizedMixin",
    "dkm_modules",
    "functional_forward",
    "module_type",
    "palettized_modules",
    "register_module",
    "supported_types",
]
