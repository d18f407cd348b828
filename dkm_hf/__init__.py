"""dkm_hf: train-time weight clustering (DKM) for Hugging Face Transformers.

    import dkm_hf
    model = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=dkm_hf.DKMConfig(bits=4))

Importing the package registers the "dkm" quantization method with transformers and teaches every
`from_pretrained` the `dkm_config=` and `dkm_inference_mode=` arguments.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedModel
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from . import checkpoint
from .config import DKMConfig
from .layers import DKMMixin, dkm_modules
from .model import dequantize, finalize, get_dkm_config, palettized_view, prepare, set_inference_mode
from .palettized import PalettizedMixin, palettized_modules
from .quantizer import DKMHfQuantizer, inference_mode_var
from .trainer import DKMCallback, DKMTrainer, DKMTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "DKMCallback",
    "DKMConfig",
    "DKMHfQuantizer",
    "DKMMixin",
    "DKMTrainer",
    "DKMTrainingArguments",
    "PalettizedMixin",
    "dequantize",
    "dkm_modules",
    "finalize",
    "get_dkm_config",
    "palettized_modules",
    "palettized_view",
    "prepare",
    "set_inference_mode",
]


def _register() -> None:
    # Registering a name twice raises in transformers; importlib.reload(dkm_hf) must not.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("dkm") is not DKMConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("dkm", None)
        register_quantization_config("dkm")(DKMConfig)
    if AUTO_QUANTIZER_MAPPING.get("dkm") is not DKMHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop("dkm", None)
        register_quantizer("dkm")(DKMHfQuantizer)


def _patch_from_pretrained() -> None:
    """`from_pretrained(..., dkm_config=...)` is `quantization_config=`; `dkm_inference_mode` picks dense/packed."""
    original = PreTrainedModel.from_pretrained
    if getattr(original, "_dkm_hf_patched", False):
        return
    original_func = original.__func__

    @functools.wraps(original_func)
    def from_pretrained(cls, *args, dkm_config: DKMConfig | None = None, dkm_inference_mode: str = "dense", **kwargs):
        if dkm_config is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError(
                    "pass the DKM configuration once: as `dkm_config=` or as `quantization_config=`, not both"
                )
            if not isinstance(dkm_config, DKMConfig):
                raise TypeError(f"dkm_config must be a dkm_hf.DKMConfig, got {type(dkm_config).__name__}")
            kwargs["quantization_config"] = dkm_config
        if dkm_inference_mode not in ("dense", "packed"):
            raise ValueError(f"dkm_inference_mode must be 'dense' or 'packed', got {dkm_inference_mode!r}")
        token = inference_mode_var.set(dkm_inference_mode)
        try:
            return original_func(cls, *args, **kwargs)
        finally:
            inference_mode_var.reset(token)

    from_pretrained._dkm_hf_patched = True
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


_register()
_patch_from_pretrained()
checkpoint.install()
