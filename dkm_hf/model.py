"""Model-level entry points: prepare a model for DKM, finalise it to palettized form, undo it."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel

from . import replace
from .config import DKMConfig
from .layers import dkm_modules
from .palettized import dense_module, palettized_modules


def get_dkm_config(model: nn.Module) -> DKMConfig | None:
    """The DKMConfig a model was prepared or loaded with (None for a model without DKM)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, DKMConfig):
        return config
    return getattr(model, "dkm_config", None)


def prepare(model: nn.Module, config: DKMConfig, init: bool = True) -> nn.Module:
    """Replace the target modules of any torch model by DKM modules (in place) and initialise their centroids.

    The same replacement `from_pretrained(..., dkm_config=config)` does; use it for models built in code.
    """
    from .quantizer import DKMHfQuantizer

    if not isinstance(config, DKMConfig):
        raise TypeError(f"config must be a dkm_hf.DKMConfig, got {type(config).__name__}")
    if get_dkm_config(model) is not None:
        raise ValueError("this model is already prepared for DKM")
    config = copy.deepcopy(config)
    replace.replace_with_dkm_modules(model, config)
    if init:
        replace.init_all_centroids(model)
    if isinstance(model, PreTrainedModel):
        model.hf_quantizer = DKMHfQuantizer(config, pre_quantized=False)
        model.hf_quantizer.quantization_config = config
        model.config.quantization_config = config
        model.is_quantized, model.quantization_method = True, "dkm"
    else:
        model.dkm_config = config
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Snap every DKM module to its nearest centroids and swap it for its palettized module (in place).

    After this, `save_pretrained` writes LUTs + packed indices and config.json records each module's layout.
    """
    config = get_dkm_config(model)
    if config is None:
        raise ValueError("finalize() needs a model prepared for DKM (dkm_config= / quantization_config= / prepare())")
    if not dkm_modules(model):
        if palettized_modules(model):
            return model
        raise ValueError("finalize(): the model has no DKM module to palettize")
    replace.finalize(model, config)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.pre_quantized = True  # it now describes a palettized checkpoint
    return model.eval()


def set_inference_mode(model: nn.Module, mode: str) -> nn.Module:
    """'dense': decode every palettized weight once (fastest forward); 'packed': decode per forward (least RAM)."""
    for _, module in palettized_modules(model):
        module.set_inference_mode(mode)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Swap every DKM / palettized module for its original torch type holding the (hard-clustered) dense weight."""
    for name, module in palettized_modules(model):
        model.set_submodule(name, dense_module(module))
    for name, module in dkm_modules(model):
        model.set_submodule(name, module.to_plain())
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """A plain model with dense weights that saves and loads without dkm_hf (transformers' `model.dequantize()`)."""
    if isinstance(model, PreTrainedModel) and getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize()
    to_dense(model)
    model.__dict__.pop("dkm_config", None)
    return model


@contextlib.contextmanager
def palettized_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily palettize a DKM model (e.g. to save it) and restore the trainable DKM modules afterwards.

    No weight is copied: the palettized modules share biases and every other tensor with the DKM modules.
    """
    config = get_dkm_config(model)
    if config is None or not dkm_modules(model):
        yield model
        return
    originals = dkm_modules(model)
    saved_fields = (config.format, copy.deepcopy(config.modules))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    quantizer = getattr(model, "hf_quantizer", None)
    pre_quantized = getattr(quantizer, "pre_quantized", None)
    was_training = model.training
    try:
        replace.finalize(model, config)
        if quantizer is not None:
            quantizer.pre_quantized = True
        yield model
    finally:
        for name, module in originals:
            model.set_submodule(name, module)
        config.format, config.modules = saved_fields
        if tied:
            model.all_tied_weights_keys.update(tied)
        if quantizer is not None:
            quantizer.pre_quantized = pre_quantized
        model.train(was_training)
