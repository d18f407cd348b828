"""`DKMHfQuantizer`: the one place that implements transformers' HfQuantizer hooks for DKM."""

from __future__ import annotations

import contextvars
import copy

from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from .config import DKMConfig
from .layers import dkm_modules
from .palettized import palettized_modules
from .replace import init_all_centroids, replace_with_dkm_modules, replace_with_palettized_modules

logger = logging.get_logger(__name__)

# Set by `from_pretrained(..., dkm_inference_mode=...)` for the duration of one load.
inference_mode_var: contextvars.ContextVar[str] = contextvars.ContextVar("dkm_inference_mode", default="dense")


class DKMHfQuantizer(HfQuantizer):
    """Swaps modules for DKM modules (training) or palettized modules (loading a compressed checkpoint).

    Hook order in `from_pretrained`: validate_environment -> _process_model_before_weight_loading (model on the meta
    device: module swap, so state-dict keys match the checkpoint) -> weights load ->
    _process_model_after_weight_loading
    (real weights: k-means initialisation, or decoding of the palettized weights).
    """

    requires_calibration = False

    def __init__(self, quantization_config: DKMConfig, **kwargs):
        # A private copy: finalising a model records its layout in the config, which must not leak into the caller's.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.checkpoint_files: list[str] = []

    @property
    def palettized(self) -> bool:
        return self.pre_quantized and self.quantization_config.format == "palettized"

    def validate_environment(self, *args, **kwargs) -> None:
        if self.quantization_config.format == "palettized" and not self.pre_quantized:
            raise ValueError(
                "DKMConfig(format='palettized') describes a saved compressed checkpoint; to compress a "
                "model pass DKMConfig(format='train') (the default)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        self.checkpoint_files = list(checkpoint_files or [])
        if self.palettized:
            from .checkpoint import check_palettized_files

            check_palettized_files(self.checkpoint_files, config, model)
            replace_with_palettized_modules(model, config)
            return model
        replace_with_dkm_modules(model, config)
        if not self.pre_quantized:
            # A dense checkpoint has no DKM state yet: it is initialised after the weights load.
            ignore = set(model._keys_to_ignore_on_load_missing or ())
            model._keys_to_ignore_on_load_missing = ignore | {r"\.centroids$", r"\.weight_scale$"}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.palettized:
            from .checkpoint import check_loaded_palettized

            check_loaded_palettized(model, self.quantization_config)
            mode = inference_mode_var.get()
            for _, module in palettized_modules(model):
                module.set_inference_mode(mode)
            return model
        if self.pre_quantized:  # a training checkpoint: its centroids (and scales) came with the weights
            for _, module in dkm_modules(model):
                module.dkm_ready = module.tied_source is None
                module._start = module._hard = None
        else:
            init_all_centroids(model)
        return model

    def get_state_dict_and_metadata(self, model):
        config = self.quantization_config
        return None, {"dkm_format": config.format, "dkm_format_version": str(config.format_version)}

    def _dequantize(self, model, dtype=None):
        from .model import to_dense

        to_dense(model)
        if dtype is not None:
            model.to(dtype)
        model.tie_weights()
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    # True for palettized models too, so a Trainer can evaluate them; their LUTs and indices are buffers, so
    # training one only updates its float parameters (biases, norms, unclustered layers).
    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True
