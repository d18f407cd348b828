"""Choosing the modules to cluster and swapping them for DKM or palettized modules."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .checkpoint import module_layout
from .config import DKMConfig, name_matches
from .layers import LUT_TORCH_DTYPES, DKMMixin, Geometry, dkm_class_for, dkm_modules
from .palettized import PalettizedMixin, palettize, palettized_class_for

logger = logging.get_logger(__name__)


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{target module: source module} for weights shared between modules (e.g. lm_head tied to the embeddings)."""
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


def select_modules(model: nn.Module, config: DKMConfig) -> list[str]:
    """Names of the modules `config` clusters, in model order. Raises if an override matches none of them."""
    selected = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (DKMMixin, PalettizedMixin)) or dkm_class_for(module) is None:
            continue
        if isinstance(module, nn.Embedding) and not config.cluster_embeddings:
            continue
        if any(name_matches(p, name) for p in config.modules_to_not_convert or []):
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
    pairs = tied_pairs(model)
    chosen = set(selected)
    for target, source in pairs.items():
        if (target in chosen) != (source in chosen):
            logger.info(f"dkm_hf: {target} and {source} share a weight but only one is selected: clustering neither")
            chosen.discard(target)
            chosen.discard(source)
    return [name for name in selected if name in chosen]


def replace_with_dkm_modules(model: nn.Module, config: DKMConfig) -> dict[str, DKMMixin]:
    """Swap every selected module for its DKM counterpart (weights shared, not copied). Works on the meta device."""
    names = select_modules(model, config)
    pairs = tied_pairs(model)
    replaced: dict[str, DKMMixin] = {}
    for name in names:
        if name in pairs and pairs[name] in names:
            continue  # tied target: done after its source
        module = model.get_submodule(name)
        spec = config.spec_for(name)
        new = dkm_class_for(module).from_module(module, spec, name=name, seed=config.seed)
        model.set_submodule(name, new)
        replaced[name] = new
    for name in names:
        if name in pairs and pairs[name] in replaced:
            module = model.get_submodule(name)
            source = replaced[pairs[name]]
            if tuple(module.weight.shape) != source.geometry.shape:
                raise ValueError(f"{name} is tied to {pairs[name]} but their weights have different shapes")
            new = dkm_class_for(module).from_module(module, source.spec, name=name)
            del new._buffers["centroids"]
            new._buffers.pop("weight_scale", None)
            object.__setattr__(new, "tied_source", source)
            model.set_submodule(name, new)
            replaced[name] = new
    if not replaced:
        logger.warning(
            "dkm_hf: no module was replaced. Check DKMConfig.target_modules / modules_to_not_convert / "
            f"weight_threshold={config.weight_threshold} against the model's module names."
        )
    return replaced


def init_all_centroids(model: nn.Module) -> None:
    """k-means initialisation of every DKM module, with a progress bar when it takes more than a moment."""
    modules = [(n, m) for n, m in dkm_modules(model) if m.tied_source is None]
    for _, module in logging.tqdm(modules, desc="dkm_hf: initialising centroids", delay=2.0, leave=False):
        module.init_centroids()


def finalize(model: nn.Module, config: DKMConfig) -> dict[str, dict]:
    """Swap every DKM module for its palettized module and record each module's layout in `config.modules`."""
    lut_dtype = LUT_TORCH_DTYPES[config.lut_dtype]
    records, done = {}, {}
    modules = dkm_modules(model)
    for name, module in sorted(modules, key=lambda item: item[1].tied_source is not None):
        new = palettize(module, lut_dtype)
        if module.tied_source is not None:
            source_name = next(n for n, m in modules if m is module.tied_source)
            object.__setattr__(new, "tied_source", done[source_name])
            records[name] = {"tied_to": source_name}
        else:
            g = module.geometry
            records[name] = {
                "bits": module.spec.bits,
                "cluster_dim": g.cluster_dim,
                "groups": g.groups,
                "shape": list(g.shape),
                "per_channel_scale": module.spec.per_channel_scale,
            }
        model.set_submodule(name, new)
        done[name] = new
    _untie(model, [n for n, r in records.items() if "tied_to" in r])
    config.modules = {name: records[name] for name in sorted(records)}
    config.format = "palettized"
    return config.modules


def replace_with_palettized_modules(model: nn.Module, config: DKMConfig) -> dict[str, PalettizedMixin]:
    """Rebuild the palettized modules recorded in `config.modules` (before a palettized checkpoint loads)."""
    lut_dtype = LUT_TORCH_DTYPES[config.lut_dtype]
    built: dict[str, PalettizedMixin] = {}
    records = config.modules
    for name in sorted(records, key=lambda n: "tied_to" in records[n]):
        record = records[name]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json lists palettized module {name!r}, which this model does not have") from None
        cls = palettized_class_for(module)
        if "tied_to" in record:
            source = built.get(record["tied_to"])
            if source is None:
                raise ValueError(
                    f"palettized module {name!r} is tied to {record['tied_to']!r}, which is not palettized"
                )
            new = cls.empty_like_module(module, source.bits, source.geometry, False, lut_dtype, tied=True)
            object.__setattr__(new, "tied_source", source)
        else:
            geometry = _recorded_geometry(name, module, record)
            new = cls.empty_like_module(module, record["bits"], geometry, record["per_channel_scale"], lut_dtype)
        model.set_submodule(name, new)
        built[name] = new
    _untie(model, [n for n, r in records.items() if "tied_to" in r])
    return built


def _recorded_geometry(name: str, module: nn.Module, record: dict) -> Geometry:
    """The Geometry config.json records for `module` (fields checked by `module_layout`), checked against the model."""
    layout = module_layout(name, record)
    shape = tuple(module.weight.shape)
    if layout.shape != shape:
        raise ValueError(
            f"config.json: palettized module {name!r} has shape {list(layout.shape)}, the model's weight is "
            f"{list(shape)}"
        )
    geometry = Geometry(shape, isinstance(module, Conv1D), layout.groups, layout.cluster_dim)
    if geometry.features % layout.cluster_dim or geometry.channels % layout.groups:
        raise ValueError(
            f"config.json: palettized module {name!r} has cluster_dim={layout.cluster_dim} and "
            f"groups={layout.groups}, which do not divide its {geometry.features} features and "
            f"{geometry.channels} channels"
        )
    return geometry


def _untie(model: nn.Module, targets: list[str]) -> None:
    """Palettized tied modules share buffers, not a `weight` parameter: drop them from transformers' tie map."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if declared:
        for name in targets:
            declared.pop(f"{name}.weight", None)
