"""Converting a model's modules between their dense, DKM and palettized forms: the one place module types change.

    to_dkm         dense -> DKM          (`init_centroids` then runs k-means on the weights)
    to_palettized  DKM -> palettized     (each vector snapped to its nearest centroid: LUT + packed indices)
    to_dense       DKM / palettized -> dense, the original module types
    to_shells      empty palettized modules for a checkpoint about to load

Every swap goes through `replace`, which keeps a module's accelerate hook (device placement) working on its
replacement. A weight shared by several modules (tied embeddings) is converted once, by its source module; the
others point at it (`tied_source`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace as replace_fields

import torch
from accelerate.hooks import add_hook_to_module
from torch import nn
from transformers.utils import logging

from ..config import DKMConfig
from ..errors import PalettizedCheckpointError
from ..nn.dkm import DKMMixin, dkm_modules
from ..nn.layout import Layout
from ..nn.palettized import PalettizedMixin, palettized_modules
from ..nn.registry import module_type
from ..ops.kmeans import kmeans_init_many
from ..ops.packing import pack_indices
from .select import select_modules, tied_pairs

logger = logging.get_logger(__name__)

# Instance attributes accelerate's `add_hook_to_module` sets; a swapped-in module must not inherit them.
_HOOK_ATTRS = ("forward", "_hf_hook", "_old_forward")
INIT_BATCH = 1 << 27  # weights per batched k-means call of `init_centroids` (their float32 vectors: 512 MB)


def replace(model: nn.Module, name: str, build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Swap `model.<name>` for `build(old)`, moving any accelerate hook from the old module to the new one."""
    old = model.get_submodule(name)
    hook = getattr(old, "_hf_hook", None)
    if hook is not None and _offloads(hook):
        raise ValueError(
            f"dkm_hf cannot convert {name}: accelerate offloads its weights (device_map with 'cpu'/'disk' offload "
            "next to an accelerator). Load the model without offloading to cluster or palettize it."
        )
    new = build(old)
    for attr in _HOOK_ATTRS:
        new.__dict__.pop(attr, None)
    if hook is not None:
        add_hook_to_module(new, hook)
    model.set_submodule(name, new)
    return new


def _offloads(hook) -> bool:
    hooks = getattr(hook, "hooks", (hook,))
    return any(getattr(h, "offload", False) for h in hooks)


def is_transposed(module: nn.Module) -> bool:
    kind = module_type(module)
    return kind is not None and kind.transposed


# -- dense -> DKM -----------------------------------------------------------------------------------------------------
def to_dkm(model: nn.Module, config: DKMConfig, with_state: bool = True) -> dict[str, DKMMixin]:
    """Swap every module `config` selects for its DKM variant (weights shared, not copied). Works on the meta device.

    `with_state=False` creates no centroid buffers (a dense checkpoint is about to load; `init_centroids` makes them).
    """
    names = select_modules(model, config)
    pairs = tied_pairs(model)
    done: dict[str, DKMMixin] = {}
    for name in sorted(names, key=lambda n: pairs.get(n) in names):  # sources before their tied targets
        module = model.get_submodule(name)
        source = done.get(pairs.get(name))
        if source is not None:
            if tuple(module.weight.shape) != source.layout.shape:
                raise ValueError(f"{name} is tied to {pairs[name]} but their weights have different shapes")
            layout, settings = source.layout, source.settings
        else:
            layout = config.layout_for(name, tuple(module.weight.shape), is_transposed(module))
            settings = config.settings_for(name)
        done[name] = replace(
            model,
            name,
            lambda m: DKMMixin.wrap(m, layout, settings, config.seed, source, with_state),  # noqa: B023
        )
    if not done:
        logger.warning(
            "dkm_hf: no module was replaced. Check DKMConfig.target_modules / modules_to_not_convert / "
            f"weight_threshold={config.weight_threshold} against the model's module names."
        )
    return {name: done[name] for name in names}


def init_centroids(model: nn.Module) -> None:
    """k-means initialisation of every DKM module that owns its centroids: the modules of one LUT size, seed and
    restart count in batched calls of at most INIT_BATCH weights (`kmeans_init_many`), with a progress bar when it
    is slow. Each module gets what its own `init_centroids` gives it."""
    batches: dict[tuple, list[list[DKMMixin]]] = {}
    for _, module in dkm_modules(model):
        if module.tied_source is None:
            key = (module.layout.n_clusters, module.dkm_seed, module.settings.kmeans_restarts)
            batch = batches.setdefault(key, [[]])
            if sum(m.weight.numel() for m in batch[-1]) + module.weight.numel() > INIT_BATCH and batch[-1]:
                batch.append([])
            batch[-1].append(module)
    todo = [(key, batch) for key, runs in batches.items() for batch in runs]
    progress = logging.tqdm(todo, desc="dkm_hf: initialising centroids", delay=2.0, leave=False)
    for (k, seed, restarts), batch in progress:
        centroids = kmeans_init_many([m.init_vectors() for m in batch], k, seed=seed, restarts=restarts)
        for module, c in zip(batch, centroids):
            module.set_centroids(c)


# -- DKM -> palettized ------------------------------------------------------------------------------------------------
@torch.no_grad()
def palettize_module(module: DKMMixin, tied_source: PalettizedMixin | None = None) -> PalettizedMixin:
    """The palettized module of one DKM module (its vectors snapped to their nearest centroids)."""
    lut_dtype = module.settings.lut_torch_dtype
    if tied_source is not None:
        return PalettizedMixin.wrap(module.unwrap(), module.layout, lut_dtype, tied_source)
    if not module.dkm_ready:
        module.init_centroids()
    new = PalettizedMixin.wrap(module.unwrap(), module.layout, lut_dtype)
    scale = module.weight_scale.to(lut_dtype) if module.layout.per_channel_scale else None
    new.fill(module.centroids.to(lut_dtype), pack_indices(module.assignments(), module.layout.bits), scale)
    return new


def to_palettized(model: nn.Module) -> dict[str, PalettizedMixin]:
    """Swap every DKM module for its palettized module (in place); tied modules keep sharing one LUT."""
    modules = dkm_modules(model)
    names = {id(m): n for n, m in modules}
    done: dict[str, PalettizedMixin] = {}
    for name, module in sorted(modules, key=lambda item: item[1].tied_source is not None):
        source = done[names[id(module.tied_source)]] if module.tied_source is not None else None
        done[name] = replace(model, name, lambda m: palettize_module(m, source))  # noqa: B023
    return done


def layouts_of(model: nn.Module) -> dict[str, Layout]:
    """{name: layout} of every palettized module; a tied module's layout names its source (`tied_to`)."""
    modules = palettized_modules(model)
    names = {id(m): n for n, m in modules}
    return {
        name: replace_fields(m.layout, tied_to=names[id(m.tied_source)]) if m.tied_source is not None else m.layout
        for name, m in modules
    }


# -- checkpoint loading ---------------------------------------------------------------------------------------------
def to_shells(model: nn.Module, layouts: dict[str, Layout], lut_dtype: torch.dtype) -> dict[str, PalettizedMixin]:
    """Swap the modules named in `layouts` for empty palettized modules of those layouts (before a checkpoint loads).

    The layouts come from config.json; each is checked against the module it replaces (errors name it).
    """
    pairs = tied_pairs(model)
    done: dict[str, PalettizedMixin] = {}
    for name in sorted(layouts, key=lambda n: layouts[n].tied_to is not None):
        layout = layouts[name]
        source_name = layout.tied_to
        if source_name is not None and name != pairs.get(source_name) and source_name != pairs.get(name):
            raise PalettizedCheckpointError(
                f"config.json: palettized module {name!r} is tied to {layout.tied_to!r}, but the model does not tie "
                f"their weights (its ties: {pairs or 'none'})"
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PalettizedCheckpointError(
                f"config.json lists palettized module {name!r}, which this model does not have"
            ) from None
        if module_type(module) is None or isinstance(module, (DKMMixin, PalettizedMixin)):
            raise PalettizedCheckpointError(f"config.json lists palettized module {name!r}, a {type(module).__name__}")
        if tuple(module.weight.shape) != layout.shape:
            raise PalettizedCheckpointError(
                f"config.json: palettized module {name!r} has shape {list(layout.shape)}, the model's weight is "
                f"{list(module.weight.shape)}"
            )
        source = done[source_name] if source_name is not None else None
        done[name] = replace(model, name, lambda m: PalettizedMixin.wrap(m, layout, lut_dtype, source))  # noqa: B023
    return done


# -- -> dense ---------------------------------------------------------------------------------------------------------
def to_dense(model: nn.Module) -> nn.Module:
    """Swap every DKM / palettized module for its original type holding the (hard-clustered) dense weight."""
    new_weights: dict[int, nn.Parameter] = {}  # id of a converted module -> its new weight (for tied modules)

    def dense(module):
        if module.tied_source is not None:
            weight = new_weights[id(module.tied_source)]
        elif isinstance(module, DKMMixin):
            weight = nn.Parameter((module.hard_weight() if module.dkm_enabled else module.weight).detach().clone())
        else:
            weight = nn.Parameter(module.decode().clone())
        new_weights[id(module)] = weight
        plain = module.unwrap()
        plain.weight = weight
        return plain

    modules = dkm_modules(model) + palettized_modules(model)
    for name, module in sorted(modules, key=lambda item: item[1].tied_source is not None):
        replace(model, name, lambda m: dense(m))
    return model
