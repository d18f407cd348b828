"""Which modules a `DKMConfig` clusters, and which of them share a weight."""

from __future__ import annotations

from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from ..config import DKMConfig, name_matches
from ..nn.dkm import DKMMixin
from ..nn.palettized import PalettizedMixin
from ..nn.registry import module_type

logger = logging.get_logger(__name__)


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{target module: source module} for weights shared between modules (e.g. lm_head tied to the embeddings).

    From transformers' declared ties and from parameters that are the same object in two places.
    """
    pairs = {}
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in declared.items():
        if target.endswith(".weight") and source.endswith(".weight"):
            pairs[target.removesuffix(".weight")] = source.removesuffix(".weight")
    owner: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None:
            continue
        if id(weight) in owner and owner[id(weight)] != name:
            pairs.setdefault(name, owner[id(weight)])
        else:
            owner[id(weight)] = name
    return pairs


def skipped_patterns(model: nn.Module, config: DKMConfig) -> list[str]:
    """`modules_to_not_convert` plus the model's `_keep_in_fp32_modules`, as transformers' quantizers combine them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return HfQuantizer.get_modules_to_not_convert(model, list(config.modules_to_not_convert or []), sorted(keep))


def select_modules(model: nn.Module, config: DKMConfig) -> list[str]:
    """Names of the modules `config` clusters, in model order. Raises if an override matches none of them.

    `modules_to_not_convert` skips a module and everything under it, with transformers' `should_convert_module`
    rules ("model.layers.0" skips "model.layers.0.mlp.up_proj"); `target_modules` and `overrides` match a name
    exactly, as a dotted suffix ("query") or as a full regex.
    """
    skipped = skipped_patterns(model, config)
    selected = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (DKMMixin, PalettizedMixin)) or module_type(module) is None:
            continue
        if isinstance(module, nn.Embedding) and not config.cluster_embeddings:
            continue
        if not should_convert_module(name, skipped):
            continue
        if config.target_modules is not None and not any(name_matches(p, name) for p in config.target_modules):
            continue
        if module.weight.numel() < config.weight_threshold:
            continue
        selected.append(name)
    for pattern in config.overrides:
        if not any(name_matches(pattern, name) for name in selected):
            raise ValueError(
                f"DKMConfig.overrides: pattern {pattern!r} matches none of the {len(selected)} modules selected for "
                f"clustering (e.g. {selected[:3]})"
            )
    # A tied weight is clustered once, by its source module; if either side is left out, both are.
    chosen = set(selected)
    for target, source in tied_pairs(model).items():
        if (target in chosen) != (source in chosen):
            logger.info(f"dkm_hf: {target} and {source} share a weight but only one is selected: clustering neither")
            chosen.discard(target)
            chosen.discard(source)
    return [name for name in selected if name in chosen]
