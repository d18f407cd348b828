"""dkm_hf: train-time weight clustering (DKM) for Hugging Face Transformers.

    import dkm_hf
    model = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=dkm_hf.DKMConfig(bits=4))

Importing the package registers the "dkm" quantization method with transformers and teaches every
`from_pretrained` the `dkm_config=` and `dkm_inference_mode=` arguments (see ARCHITECTURE.md for the layers).
"""

from __future__ import annotations

import warnings

from .config import DKMConfig
from .errors import PalettizedCheckpointError
from .integrations import peft_patches, transformers_patches
from .integrations.callback import DKMCallback
from .integrations.distributed import full_weights
from .integrations.quantizer import DKMHfQuantizer, dequantize, prepare
from .integrations.trainer import (
    DKMTrainer,
    DKMTrainerMixin,
    DKMTrainingArguments,
    with_dkm_arguments,
)
from .nn import (
    DKMMixin,
    DKMWeight,
    Layout,
    PalettizedMixin,
    PalettizedWeight,
    dkm_modules,
    palettized_modules,
    register_module,
)
from .surgery import (
    allocate_bits,
    get_dkm_config,
    gptq_snap,
    gradient_importance,
    init_centroids,
    palettize,
    palettized_view,
    set_importance,
    set_inference_mode,
)

__version__ = "0.2.0"

__all__ = [
    "DKMCallback",
    "DKMConfig",
    "DKMHfQuantizer",
    "DKMMixin",
    "DKMTrainer",
    "DKMTrainerMixin",
    "DKMTrainingArguments",
    "DKMWeight",
    "Layout",
    "PalettizedCheckpointError",
    "PalettizedMixin",
    "PalettizedWeight",
    "allocate_bits",
    "dequantize",
    "dkm_modules",
    "full_weights",
    "get_dkm_config",
    "gptq_snap",
    "gradient_importance",
    "init_centroids",
    "palettize",
    "palettized_modules",
    "palettized_view",
    "prepare",
    "register_module",
    "set_importance",
    "set_inference_mode",
    "with_dkm_arguments",
]

_DEPRECATED = {"finalize": ("palettize", palettize)}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new_name, value = _DEPRECATED[name]
        warnings.warn(f"dkm_hf.{name} is deprecated; use dkm_hf.{new_name}", FutureWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'dkm_hf' has no attribute {name!r}")


transformers_patches.install(DKMConfig, DKMHfQuantizer)
peft_patches.install()
