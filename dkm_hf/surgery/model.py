"""The model-level operations: prepare (dense -> DKM), palettize (DKM -> palettized), dequantize (-> dense), the
inference mode of palettized modules, and what a model's saved checkpoint will hold."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn
from transformers.utils import logging

from ..config import CheckpointRecord, DKMConfig
from ..nn.dkm import DKMMixin, DKMWeight, dkm_modules
from ..nn.palettized import MODES, palettized_modules
from ..nn.scopes import VIEWED, add_parent_scopes, remove_parent_scopes
from ..nn.weights import swap_class
from .convert import kmeans_all, layout_for, layouts_of, to_dense, to_dkm, to_palettized
from .select import check_clusterable, half_palettized_ties, untied_by_config

logger = logging.get_logger(__name__)


def get_dkm_config(model: nn.Module) -> DKMConfig | None:
    """The DKMConfig a model was prepared or loaded with (None for a model without DKM)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, DKMConfig):
        return config
    return model.__dict__.get("dkm_config")


def prepare(model: nn.Module, config: DKMConfig, init: bool = True) -> nn.Module:
    """Make the weights `config` selects DKM weights (in place) and initialise their centroids (k-means).

    Keeps a private copy of `config` as `model.dkm_config`. For transformers models use `dkm_hf.prepare`, which also
    attaches the quantizer so that `save_pretrained` / `from_pretrained` know the model.
    """
    if not isinstance(config, DKMConfig):
        raise TypeError(f"config must be a dkm_hf.DKMConfig, got {type(config).__name__}")
    if dkm_modules(model) or palettized_modules(model):
        raise ValueError("this model is already prepared for DKM (or palettized)")
    if get_dkm_config(model) is not None:
        raise ValueError(
            "this model has no DKM module but its config carries a DKMConfig (config.quantization_config: built from "
            "a DKM model's config?); remove it (del model.config.quantization_config) before preparing"
        )
    config = copy.deepcopy(config)
    config.post_init()  # a config changed after it was built is checked before anything changes
    converted = to_dkm(model, config)
    if init:
        kmeans_all(model)
    if converted:  # with nothing selected (warned) the model stays as it was, to be prepared again
        model.dkm_config = config
    return model


def palettize(model: nn.Module) -> nn.Module:
    """Snap every DKM module to its nearest centroids and swap it for its palettized module (in place, then eval).

    After this, `save_pretrained` writes LUTs + packed indices and config.json records each module's layout.
    """
    if not dkm_modules(model):
        if palettized_modules(model):
            remove_parent_scopes(model)  # a copy taken inside palettized_view keeps the view's scopes otherwise
            return model.eval()
        raise ValueError("palettize() needs a model with DKM modules (dkm_config= / quantization_config= / prepare())")
    to_palettized(model)
    return model.eval()


def dequantize(model: nn.Module) -> nn.Module:
    """Swap every DKM / palettized module for its original type holding the dense (hard-clustered) weight."""
    to_dense(model)
    model.__dict__.pop("dkm_config", None)
    return model


def set_inference_mode(model: nn.Module, mode: str) -> nn.Module:
    """'dense': decode every palettized weight once, on first use (fastest forward); 'packed': decode per forward
    (least memory)."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {list(MODES)}, got {mode!r}")
    for _, weight in palettized_modules(model):
        weight.set_inference_mode(mode)
    return model


def untie_declined(model: nn.Module) -> list[str]:
    """At load, after transformers' `tie_weights`: each tied DKM weight whose module holds a parameter of its own
    (transformers leaves a declared tie untied where the checkpoint stores both sides with different values: T5
    v1.1's head, a head dequantized alone) becomes a clustered weight of its own, with the config's settings for its
    name, its centroids to be initialised from the loaded weight (`untied_at_load`). Returns their names."""
    config, untied = get_dkm_config(model), []
    for name, w in dkm_modules(model) if config is not None else ():
        own, shared = w.weight, w.tied_source.weight if w.tied_source is not None else None
        if shared is None or own is shared or own.is_meta and shared.is_meta:
            continue
        module, param, settings = w.module, w.param, config.settings_for(name)
        check_clusterable(name, own, settings.lut_torch_dtype)
        state = DKMWeight(module, param, layout_for(config, name, module, param), settings, config.seed)
        DKMMixin.attach(module, {param: state})
        state.register_state()
        state.untied_at_load = True
        untied.append(name)
    if untied:
        logger.warning(
            f"dkm_hf: {untied} stored with values of their own, though the config ties them (transformers leaves "
            "them untied): each is clustered on its own"
        )
    return untied


def record_of(model: nn.Module) -> CheckpointRecord:
    """What saving `model` now writes: a training checkpoint (DKM modules) or a palettized one (with its layouts)."""
    if dkm_modules(model) and palettized_modules(model):
        raise ValueError("the model holds both DKM and palettized modules; palettize() it before saving")
    layouts = layouts_of(model)
    tied = {n: lay.tied_to for n, lay in layouts.items() if lay.tied_to}
    weights = dkm_modules(model)
    names = {id(w): n for n, w in weights}
    tied |= {n: names.get(id(w.tied_source)) for n, w in weights if w.tied_source is not None}
    for target, source in untied_by_config(model, tied):
        raise ValueError(
            f"{target} is clustered tied to {source} (one weight, one LUT for both), but the model's config no longer "
            "ties them (tie_word_embeddings=False): the checkpoint would not load as saved (its loader gives "
            f"{target} a weight of its own). Set config.tie_word_embeddings = True again to save it, or "
            "dkm_hf.dequantize(model) first; nothing was saved"
        )
    for target, source in half_palettized_ties(model, set(layouts)):
        raise ValueError(
            f"the model's config ties {target} to {source}, but only one of them is palettized (the other dequantized "
            "alone): the checkpoint would not load as saved. Set config.tie_word_embeddings = False to store them "
            "apart; nothing was saved"
        )
    return CheckpointRecord.of(layouts)


@contextlib.contextmanager
def palettized_view(model: nn.Module, gathered=contextlib.nullcontext) -> Iterator[nn.Module]:
    """Temporarily palettize a DKM model (e.g. to save it) and put the trainable DKM modules back afterwards.

    No weight is copied: the palettized modules share biases and every other tensor with the DKM modules.
    `gathered(model)` is the context the conversion runs in (`dkm_hf.full_weights` for a sharded model).
    """
    originals = [(name, m) for name, m in model.named_modules() if name and isinstance(m, DKMMixin)]
    if not originals and not isinstance(model, DKMMixin):
        yield model
        return
    # a root holding clustered weights itself is converted in place: its class and attributes are put back, each dict
    # the same object as before (hook handles hold the hook dicts)
    root = None
    if isinstance(model, DKMMixin):
        root = (type(model), {k: (v, dict(v) if isinstance(v, dict) else None) for k, v in model.__dict__.items()})
    was_training = model.training
    VIEWED.add(model)
    try:
        with gathered(model):
            to_palettized(model, view=True)
        yield model
    finally:
        VIEWED.discard(model)
        for name, module in originals:
            model.set_submodule(name, module)
        if root is not None:
            model.__dict__.clear()
            for key, (value, contents) in root[1].items():
                if contents is not None:
                    value.clear()
                    value.update(contents)
                model.__dict__[key] = value
            swap_class(model, root[0])
        # scopes inside the model that a forward or a palettize() in the view removed (those above it stay: VIEWED)
        add_parent_scopes(model)
        model.train(was_training)
