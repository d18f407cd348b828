"""Which weights a `DKMConfig` clusters, and which of them are shared between modules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from ..config import DKMConfig, name_matches
from ..nn.dkm import DKMMixin, DKMWeight
from ..nn.palettized import PalettizedMixin, PalettizedWeight
from ..nn.weights import weight_name

logger = logging.get_logger(__name__)


def named_weights(model: nn.Module):
    """(weight name, module name, module, parameter name) of every parameter of >= 2 dimensions, in model order; a
    parameter shared by two modules (tied embeddings) is listed under both."""
    for module_name, module in model.named_modules():
        for param, tensor in module._parameters.items():
            if isinstance(tensor, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{module_name or type(module).__name__}.{param} is not materialised yet (a lazy module, e.g. "
                    "nn.LazyLinear): run the model once on an input before clustering it"
                )
            if tensor is not None and tensor.dim() >= 2:
                yield weight_name(module_name, param), module_name, module, param


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{target weight: source weight} for weights shared between modules (e.g. lm_head tied to the embeddings).

    From transformers' declared ties and from parameters that are the same object in two places.
    """
    pairs = {}
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in declared.items():
        pairs[_key_name(target)] = _key_name(source)
    owner: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param, tensor in module._parameters.items():
            if tensor is None:
                continue
            name = weight_name(module_name, param)
            if id(tensor) in owner and owner[id(tensor)] != name:
                pairs.setdefault(name, owner[id(tensor)])
            else:
                owner.setdefault(id(tensor), name)
    return pairs


def _key_name(key: str) -> str:
    """The weight name (`nn.weights.weight_name`) of a state-dict key `module.param`."""
    module_name, _, param = key.rpartition(".")
    return weight_name(module_name, param)


def check_ties(weights: list[tuple[str, DKMWeight | PalettizedWeight]]) -> None:
    """Each tied weight of `weights` (a model's DKM or palettized weights) has its source among them and, clustered,
    still holds its source's parameter or one of the same values (a load with `assign=True`, `.to("meta")` give each
    module a parameter of its own): a ValueError naming it otherwise (called before anything changes)."""
    names = {id(w): n for n, w in weights}
    for name, w in weights:
        if w.tied_source is None:
            continue
        if id(w.tied_source) not in names:
            raise ValueError(
                f"{name} is tied to a clustered weight that is not part of the model (the weight it shared was "
                "replaced or dequantized alone after clustering, e.g. set_input_embeddings(...) or "
                "dkm_hf.dequantize(model.model.embed_tokens); or the model given is a part of one): replace weights "
                "before clustering, or dkm_hf.dequantize(model) as a whole and prepare it again"
            )
        if isinstance(w, DKMWeight) and not _holds_its_source(w):
            raise ValueError(
                f"{name} was clustered tied to {names[id(w.tied_source)]} (one weight and one set of centroids for "
                "both), but its module holds a weight of its own now (untied or replaced after clustering, or loaded "
                "with load_state_dict(assign=True)): untie the dense model before clustering it, or tie it again "
                "(config.tie_word_embeddings = True, model.tie_weights())"
            )


def _holds_its_source(state: DKMWeight) -> bool:
    own, shared = state.module._parameters.get(state.param), state.tied_source.weight
    if own is shared or own is not None and own.is_meta and shared.is_meta:
        return True
    same = own is not None and (own.shape, own.dtype, own.device) == (shared.shape, shared.dtype, shared.device)
    return same and torch.equal(own, shared)


def half_palettized_ties(model: nn.Module, palettized: set[str]) -> list[tuple[str, str]]:
    """The ties the model's config declares ({target: source} weight names) with one side palettized and the other
    not (a side dequantized alone): a checkpoint so saved would not load while the config ties them."""
    try:
        declared = model.get_expanded_tied_weights_keys(all_submodels=True)
    except (AttributeError, ValueError):  # not a transformers model; a pattern over renamed (palettized) parameters
        return []
    pairs = [(_key_name(t), _key_name(s)) for t, s in declared.items()]
    return [(t, s) for t, s in pairs if (t in palettized) != (s in palettized)]


def untied_by_config(model: nn.Module, tied: dict[str, str]) -> list[tuple[str, str]]:
    """The pairs of `tied` ({target: source} weight names) that the model's class ties but its config no longer does
    (`tie_word_embeddings=False`, set after the weights were tied): a model built from that config has no such tie."""
    found = []
    for prefix, module in model.named_modules():
        declared = getattr(module, "_tied_weights_keys", None)
        if not isinstance(declared, dict) or getattr(getattr(module, "config", None), "tie_word_embeddings", True):
            continue
        for target, source in declared.items():
            pair = (_key_name(f"{prefix}.{target}".strip(".")), _key_name(f"{prefix}.{source}".strip(".")))
            if tied.get(pair[0]) == pair[1]:
                found.append(pair)
    return found


def fp32_patterns(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """The model's `_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict` patterns (T5's `wo`, MoE routers);
    with `dtype`, those transformers loads in float32 in a model of that dtype (`_get_dtype_plan`: the first list
    in float16, the strict one in float16 and bfloat16)."""
    plain = getattr(model, "_keep_in_fp32_modules", None) or ()
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if dtype is not None:
        plain = plain if dtype == torch.float16 else ()
        strict = strict if dtype in (torch.float16, torch.bfloat16) else ()
    return sorted({*plain, *strict})


def skipped_patterns(model: nn.Module, config: DKMConfig) -> tuple[list[str], list[str]]:
    """`modules_to_not_convert`, and the model's `fp32_patterns`, which transformers' quantizers leave out too;
    `target_modules` naming such a weight clusters it."""
    skipped = HfQuantizer.get_modules_to_not_convert(model, list(config.modules_to_not_convert or []))
    return skipped, fp32_patterns(model)


def select_weights(model: nn.Module, config: DKMConfig) -> list[str]:
    """Names of the weights `config` clusters, in model order. Raises if an override matches none of them.

    Candidates are the parameters of two or more dimensions of any module, biases (`bias`, `*_bias`) excepted.
    `modules_to_not_convert` skips a module (or a weight) and everything under it, with transformers'
    `should_convert_module` rules ("model.layers.0" skips "model.layers.0.mlp.up_proj"); `target_modules` and
    `overrides` match a weight's name (see `nn.weights.weight_name`: the module's name for a `weight`) exactly, as a
    dotted suffix ("query") or as a full regex.
    """
    skipped, fp32 = skipped_patterns(model, config)
    _warn_unmatched(model, config)
    selected, kept = [], []
    for name, module_name, module, param in named_weights(model):
        if isinstance(module, (DKMMixin, PalettizedMixin)):
            continue
        if param == "bias" or param.endswith("_bias"):  # GPT-OSS's per-expert biases are 2-D
            continue
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and param == "weight":
            if not config.cluster_embeddings:
                continue
            if module.sparse:  # DKM's soft weight is dense: its gradient cannot be sparse
                logger.warning(f"dkm_hf: {name} has sparse gradients (sparse=True): left unclustered")
                continue
        full = f"{module_name}.{param}" if module_name else param
        if not all(should_convert_module(n, skipped) for n in (module_name, full)):
            continue
        targeted = config.target_modules is not None and any(name_matches(p, name) for p in config.target_modules)
        if config.target_modules is not None and not targeted:
            continue
        if module._parameters[param].numel() < config.weight_threshold:
            continue
        if not targeted and not all(should_convert_module(n, fp32) for n in (module_name, full)):
            kept.append(name)
            continue
        if not module_name and param == "weight":  # weights are named by the module holding them; a bare layer's not
            logger.warning(
                "dkm_hf: the `weight` of the module given to prepare itself is left dense: give prepare a module "
                "that holds this one (e.g. nn.Sequential(layer)) to cluster it"
            )
            continue
        selected.append(name)
    if kept:
        logger.warning_once(
            f"dkm_hf: {len(kept)} weight(s) left unclustered, as transformers' quantizers leave the modules a model "
            f"keeps in float32 in half precision ({fp32}; e.g. {kept[:2]}). Name them in DKMConfig.target_modules "
            "to cluster them"
        )
    prefix = getattr(model, "base_model_prefix", "")
    for pattern in config.overrides:
        if not any(name_matches(pattern, name) for name in selected):
            hint = ""
            if prefix and any(name_matches(pattern, f"{prefix}.{name}") for name in selected):
                hint = (
                    f"; it matches them with the head model's prefix {prefix!r}: a checkpoint of a model with a head "
                    "loads into its base model as a palettized checkpoint, or into the class it was trained as"
                )
            raise ValueError(
                f"DKMConfig.overrides: pattern {pattern!r} matches none of the {len(selected)} weights selected for "
                f"clustering (e.g. {selected[:3]}){hint}"
            )
    # A tied weight is clustered once, by its source; if either side is left out, both are.
    chosen = set(selected)
    pairs = tied_pairs(model)
    for target, source in pairs.items():
        if (target in chosen) != (source in chosen):
            logger.warning(
                f"dkm_hf: {target} and {source} share a weight but only one is selected (target_modules / "
                "modules_to_not_convert / weight_threshold): clustering neither"
            )
            chosen.discard(target)
            chosen.discard(source)
    for target, source in pairs.items():
        if target in chosen:
            _check_tied_overrides(config, target, source)
    return [name for name in selected if name in chosen]


def _warn_unmatched(model: nn.Module, config: DKMConfig) -> None:
    """A warning for each of the user's `target_modules` / `modules_to_not_convert` patterns that names no weight of
    the model (a misspelt `modules_to_not_convert` entry would otherwise cluster what it meant to keep, silently)."""
    names = [(name, module_name, f"{module_name}.{param}") for name, module_name, _, param in named_weights(model)]
    for pattern in config.target_modules or []:
        if not any(name_matches(pattern, name) for name, _, _ in names):
            logger.warning(f"dkm_hf: DKMConfig.target_modules pattern {pattern!r} names no weight in the model")
    for pattern in config.modules_to_not_convert or []:
        if all(should_convert_module(m, [pattern]) and should_convert_module(f, [pattern]) for _, m, f in names):
            logger.warning(f"dkm_hf: DKMConfig.modules_to_not_convert entry {pattern!r} names no weight in the model")


def _check_tied_overrides(config: DKMConfig, target: str, source: str) -> None:
    """An override that matches the tied side of a weight but not its source would be ignored (the pair is
    clustered once, with the source's settings): refused where it gives the pair settings other than the source's."""
    own = [p for p in config.overrides if name_matches(p, target) and not name_matches(p, source)]
    mine, theirs = config._values_for(target), config._values_for(source)
    differ = [f"{k}: {mine[k]!r} against {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
    if own and differ:
        raise ValueError(
            f"DKMConfig.overrides {own} match {target}, which shares its weight with {source} (tied): the pair is "
            f"clustered once, with the settings of {source}, and these differ ({'; '.join(differ)}). Use a pattern "
            f"that matches {source} too, or untie the weights."
        )


def check_clusterable(name: str, weight: torch.Tensor, lut_dtype: torch.dtype) -> None:
    """A ValueError naming the problem for a weight whose values cannot be clustered: NaN or infinite values; values
    beyond the LUT dtype's range (the palettized model would hold inf); values whose squared distances, summed over
    the weight in float32 by k-means and the DKM loop, could overflow."""
    if weight.is_meta:
        return
    if not weight.numel():
        return
    low, high = float(weight.detach().amin()), float(weight.detach().amax())  # no copy of the weight; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        cast = " (a float16 weight: values beyond float16's range become inf in a cast; load in float32 or bfloat16)"
        raise ValueError(
            f"{name}: {int((~torch.isfinite(weight)).sum())} value(s) of the weight are NaN or infinite"
            f"{cast if weight.dtype == torch.float16 and not weight.isnan().any() else ''}; k-means would make every "
            "centroid of its LUT non-finite. Repair the weight or leave it out (modules_to_not_convert)"
        )
    largest = max(-low, high)
    if largest > torch.finfo(lut_dtype).max:
        raise ValueError(
            f"{name}: values up to {largest:.3g}, beyond the LUT dtype's range ({str(lut_dtype)[6:]}: "
            f"+-{torch.finfo(lut_dtype).max:.5g}); the palettized weight would hold inf. Use lut_dtype='bfloat16' or "
            "'float32', or leave the weight out (modules_to_not_convert)"
        )
    limit = (torch.finfo(torch.float32).max / (4 * weight.numel())) ** 0.5
    if largest > limit:
        raise ValueError(
            f"{name}: values up to {largest:.3g}; the squared distances that k-means and the DKM loop sum in "
            f"float32 could overflow above {limit:.3g} for a weight of {weight.numel()} values. Rescale the weight or "
            "leave it out (modules_to_not_convert)"
        )
