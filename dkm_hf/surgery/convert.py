"""Converting a model's weights between their dense, DKM and palettized forms: the one place where they change.

    to_dkm         dense -> DKM          (`kmeans_all` then runs k-means on the weights)
    to_palettized  DKM -> palettized     (each vector snapped to its nearest centroid: LUT + packed indices)
    to_dense       DKM / palettized -> dense, the modules back in their own classes
    to_shells      empty palettized weights for a checkpoint about to load

Every conversion changes the module that holds a weight in place (`nn.weights.swap_class`): the same object, its
own class underneath, its accelerate hook re-attached. A weight shared by several modules (tied embeddings) is
converted once, by its source; the others point at it (`tied_source`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace as replace_fields

import torch
from accelerate.hooks import add_hook_to_module
from torch import nn
from transformers.utils import logging

from ..config import DKMConfig
from ..errors import PalettizedCheckpointError
from ..nn.dkm import DKMMixin, DKMWeight, dkm_modules
from ..nn.layout import Layout
from ..nn.palettized import PalettizedMixin, PalettizedWeight, palettized_modules
from ..nn.scopes import add_parent_scopes, remove_parent_scopes
from ..nn.weights import (
    base_class,
    channel_dims,
    is_sharded,
    is_transposed,
    split_name,
    swap_class,
    variant_class,
    weight_name,
)
from ..ops.attention import hard_assign_slices
from ..ops.kmeans import kmeans_init_many
from ..ops.packing import pack_stream
from .select import check_clusterable, check_ties, select_weights, tied_pairs

logger = logging.get_logger(__name__)

# Instance attributes accelerate's `add_hook_to_module` sets; a copied module must not inherit them.
_HOOK_ATTRS = ("forward", "_hf_hook", "_old_forward")
INIT_BATCH = 1 << 27  # weights per batched k-means call of `kmeans_all` (their float32 vectors: 512 MB)


def _check_not_offloaded(module: nn.Module, name: str) -> None:
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,)) if hook is not None else ()
    if any(getattr(h, "offload", False) for h in hooks):
        raise ValueError(
            f"dkm_hf cannot convert {name}: accelerate offloads its weights (device_map with 'cpu'/'disk' offload "
            "next to an accelerator). Load the model without offloading to cluster or palettize it."
        )


def _by_module(model: nn.Module, names) -> Iterator[tuple[str, nn.Module, dict[str, str]]]:
    """(module name, module, {parameter: weight name}) for the weights `names`, grouped by module, in order."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        module_name, param = split_name(model, name)
        groups.setdefault(module_name, {})[param] = name
    for module_name, params in groups.items():
        yield module_name, model.get_submodule(module_name), params


def layout_for(config: DKMConfig, name: str, module: nn.Module, param: str) -> Layout:
    shape = tuple(module._parameters[param].shape)
    dims = channel_dims(param, len(shape))
    return config.layout_for(name, shape, is_transposed(module, param), dims)


# -- dense -> DKM -----------------------------------------------------------------------------------------------------
def to_dkm(
    model: nn.Module, config: DKMConfig, with_state: bool = True, untied: Iterable[str] = (), loaded: bool = True
) -> dict[str, DKMWeight]:
    """Make every weight `config` selects a DKM weight (in place, nothing copied). Works on the meta device.

    `with_state=False` creates no centroid buffers (a dense checkpoint is about to load; `kmeans_all` makes them).
    `untied`: tied targets clustered on their own (a checkpoint stores them so). `loaded=False`: the weights hold no
    values yet (before a checkpoint loads; legacy `torch.Tensor(n)` parameters hold uninitialised memory, not meta):
    their values are checked when their centroids are made.
    """
    names = select_weights(model, config)
    untied = set(untied)
    pairs = {target: source for target, source in tied_pairs(model).items() if target not in untied}
    done: dict[str, DKMWeight] = {}
    ordered = sorted(names, key=lambda n: pairs.get(n) in names)  # sources before their tied targets
    # every weight's layout first (a geometry error names its weight): nothing is attached before all are valid
    planned = []
    for module_name, module, params in _by_module(model, ordered):
        _check_not_offloaded(module, module_name)
        states = {}
        for param, name in params.items():
            source = done.get(pairs.get(name))
            if source is not None:
                if tuple(module._parameters[param].shape) != source.layout.shape:
                    raise ValueError(f"{name} is tied to {pairs[name]} but their weights have different shapes")
                state = DKMWeight(module, param, source.layout, source.settings, config.seed, source)
            else:
                if loaded:
                    check_clusterable(name, module._parameters[param], config.settings_for(name).lut_torch_dtype)
                layout = layout_for(config, name, module, param)
                state = DKMWeight(module, param, layout, config.settings_for(name), config.seed)
            states[param] = done[name] = state
        planned.append((module, states))
    for module, states in planned:
        DKMMixin.attach(module, states)
        if with_state:
            for state in states.values():
                if state.tied_source is None:
                    state.register_state()
    add_parent_scopes(model)
    if not done:
        logger.warning(
            "dkm_hf: no weight was selected. Check DKMConfig.target_modules / modules_to_not_convert / "
            f"weight_threshold={config.weight_threshold} against the model's module names."
        )
    return {name: done[name] for name in names}


def kmeans_all(model: nn.Module, importance: Mapping[int, torch.Tensor] | None = None) -> None:
    """k-means initialisation of every DKM weight that owns its centroids: the weights of one LUT size, seed and
    restart count in batched calls of at most INIT_BATCH weights (`kmeans_init_many`), with a progress bar when it
    is slow. Each weight gets what its own `init_centroids` gives it. `importance`: {id of a DKM weight: the
    importance of its vectors (groups, n, d)}, which weighs that weight's k-means (`surgery.importance`)."""
    weighted = importance or {}
    for name, module in dkm_modules(model):  # a checkpoint just loaded into the model
        if module.tied_source is None:
            check_clusterable(name, module.weight, module.settings.lut_torch_dtype)
    owners = [module for _, module in dkm_modules(model) if module.tied_source is None]
    todo = kmeans_batches(owners, lambda m: (m.layout.n_clusters, m.dkm_seed, m.settings.kmeans_restarts))
    progress = logging.tqdm(todo, desc="dkm_hf: initialising centroids", delay=2.0, leave=False)
    for (k, seed, restarts), batch in progress:
        vectors, weights = [m.init_vectors() for m in batch], [weighted.get(id(m)) for m in batch]
        centroids = kmeans_init_many(vectors, k, seed=seed, restarts=restarts, importance=weights)
        for module, c in zip(batch, centroids):
            module.set_centroids(c)


def kmeans_batches(states: list[DKMWeight], key: Callable[[DKMWeight], tuple]) -> list[tuple[tuple, list[DKMWeight]]]:
    """(key, batch) pairs: `states` grouped by `key` (what one batched k-means call shares), each group in batches
    of at most INIT_BATCH weights (a larger weight alone), in the order of the states."""
    runs: dict[tuple, list[list[DKMWeight]]] = {}
    for state in states:
        batches = runs.setdefault(key(state), [[]])
        if batches[-1] and sum(s.weight.numel() for s in batches[-1]) + state.weight.numel() > INIT_BATCH:
            batches.append([])
        batches[-1].append(state)
    return [(k, batch) for k, batches in runs.items() for batch in batches]


# -- DKM -> palettized ------------------------------------------------------------------------------------------------
def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new DKM module object sharing every tensor (its dicts copied), its hook re-attached. Its class is the DKM
    variant of the module's own class, without a wrapper class FSDP2 may have put on top (the copy is not sharded)."""
    cls = variant_class(DKMMixin, base_class(module), type(module)._dkm_params)
    new = object.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    hook = new.__dict__.get("_hf_hook")
    for attr in _HOOK_ATTRS:
        new.__dict__.pop(attr, None)
    if hook is not None:
        add_hook_to_module(new, hook)
    return new


def _packed_indices(state: DKMWeight) -> torch.Tensor:
    """The packed nearest-centroid indices of a weight, assigned and packed a slice at a time."""
    vectors = state.vectors(float32=False)  # a 16-bit weight's own values: assigned in float32 a slice at a time
    pieces = hard_assign_slices(vectors, state.centroids)
    return pack_stream(pieces, vectors.shape[0] * vectors.shape[1], state.layout.bits, vectors.device)


@torch.no_grad()
def to_palettized(model: nn.Module, view: bool = False) -> dict[str, PalettizedWeight]:
    """Make every DKM weight a palettized weight (its vectors snapped to their nearest centroids); tied weights keep
    sharing one LUT. The DKM modules are left as they are: new module objects of the same class (sharing every other
    tensor) take their place in the model, so that whatever still holds the DKM modules (FSDP2 putting its shards
    back after `full_weights`, `palettized_view` putting them back) never touches the palettized ones. `view`: the
    DKM modules will come back, keep their parents' scopes."""
    done: dict[int, PalettizedWeight] = {}  # id of a DKM weight -> its palettized weight
    out: dict[str, PalettizedWeight] = {}
    flushed: list[str] = []  # weights whose LUT loses centroids below the LUT dtype's normal range
    small_scales: list[str] = []  # and those whose per-channel scales it loses
    check_ties(dkm_modules(model))  # before any module changes: a tie it cannot keep fails here
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, DKMMixin)]
    # modules whose weights are all sources first, so that tied targets find theirs
    modules.sort(key=lambda item: any(s.tied_source is not None for s in item[1].dkm_weights.values()))
    sharded = is_sharded(model)
    for module_name, module in modules:
        states = module.dkm_weights
        target = module
        if module_name:
            target = _shallow_copy(module)
            model.set_submodule(module_name, target)
            for key, p in target._parameters.items():
                if sharded and p is not None and key not in states:
                    # FSDP2's gathered tensor (a bias), freed when the unit shards again: the copy keeps its own
                    target._parameters[key] = nn.Parameter(p.detach().clone(), p.requires_grad)
        values = {}  # the LUT, packed indices and scale of every weight that owns its LUT
        for param, state in states.items():
            if state.tied_source is None:
                if not state.dkm_ready:
                    state.init_centroids()
                lut_dtype = state.settings.lut_torch_dtype
                scale = state.weight_scale.to(lut_dtype) if state.layout.per_channel_scale else None
                if _underflows(state.centroids, lut_dtype):
                    flushed.append(weight_name(module_name, param))
                if scale is not None and _underflows(state.weight_scale.reshape(-1, 1, 1), lut_dtype):
                    small_scales.append(weight_name(module_name, param))
                values[param] = (
                    state.centroids.to(lut_dtype),
                    _packed_indices(state),
                    scale,
                )
        for state in states.values():  # the DKM buffers go before palettized ones (`weight_scale`) take their names
            for name in state.state_names():
                target._buffers.pop(name, None)
        target.__dict__.pop("dkm_weights", None)
        new = {}
        for param, state in states.items():
            source = done.get(id(state.tied_source)) if state.tied_source is not None else None
            if state.tied_source is not None and source is None:
                raise ValueError(f"{module_name}.{param} is tied to a weight that is not being palettized")
            weight = PalettizedWeight(target, param, state.layout, state.weight.dtype, source)
            if source is None:
                weight.register(state.settings.lut_torch_dtype, state.weight.device)
                weight.fill(*values[param])
            new[param] = done[id(state)] = out[weight_name(module_name, param)] = weight
        PalettizedMixin.attach(target, new)
    if not view:
        remove_parent_scopes(model)
    if flushed:
        logger.warning(
            f"dkm_hf: {len(flushed)} weight(s) have LUTs whose every centroid is below the LUT dtype's normal range, "
            f"stored as subnormals or zeros with less precision (e.g. {flushed[:3]}): use lut_dtype='bfloat16' / "
            "'float32' (or per_channel_scale=True, where the rows' own scales are within its range)"
        )
    if small_scales:
        logger.warning(
            f"dkm_hf: {len(small_scales)} weight(s) have per-channel scales below the LUT dtype's normal range, "
            f"stored as subnormals or zeros with less precision (e.g. {small_scales[:3]}): use lut_dtype='bfloat16' "
            "or 'float32'"
        )
    return out


def _underflows(centroids: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a LUT group's centroids (G, k, d) are all below `dtype`'s smallest normal number (float16: 6.1e-5) and
    not all zero: the group is stored with less than the dtype's precision, or as zeros."""
    largest = centroids.abs().flatten(1).amax(1)
    return bool(((largest > 0) & (largest < torch.finfo(dtype).tiny)).any())


def layouts_of(model: nn.Module) -> dict[str, Layout]:
    """{name: layout} of every palettized weight; a tied weight's layout names its source (`tied_to`)."""
    weights = palettized_modules(model)
    check_ties(weights)
    return weight_layouts(weights)


def weight_layouts(weights: Iterable[tuple[str, DKMWeight | PalettizedWeight]]) -> dict[str, Layout]:
    """{name: layout} of (name, DKM or palettized weight) pairs; a tied weight's layout names its source."""
    weights = list(weights)
    names = {id(w): n for n, w in weights}
    return {
        name: w.layout if w.tied_source is None else _tied(w.layout, names[id(w.tied_source)]) for name, w in weights
    }


def _tied(layout: Layout, source: str) -> Layout:
    return replace_fields(layout, tied_to=source)


# -- checkpoint loading ---------------------------------------------------------------------------------------------
def to_shells(model: nn.Module, layouts: dict[str, Layout], lut_dtype: torch.dtype) -> dict[str, PalettizedWeight]:
    """Make the weights named in `layouts` empty palettized weights of those layouts (before a checkpoint loads).

    The layouts come from config.json; each is checked against the weight it replaces (errors name it).
    """
    pairs = tied_pairs(model)
    for target, source in pairs.items():
        if (target in layouts) != (source in layouts):
            listed, other = (target, source) if target in layouts else (source, target)
            raise PalettizedCheckpointError(
                f"config.json: palettized module {listed!r} shares its weight with {other!r} in this model (tied), "
                f"but quantization_config.modules has no record of {other!r} (a tied weight is recorded as "
                f"{{'tied_to': {source!r}}}); restore the checkpoint's config.json"
            )
        # a pair stored untied (a LUT and indices each) loads untied, as transformers leaves a declared tie whose
        # sides are stored with different values (T5 v1.1's head: its config ties the pair whatever it says)
    done: dict[str, PalettizedWeight] = {}
    for name in sorted(layouts, key=lambda n: layouts[n].tied_to is not None):
        layout = layouts[name]
        source_name = layout.tied_to
        if source_name is not None and name != pairs.get(source_name) and source_name != pairs.get(name):
            raise PalettizedCheckpointError(
                f"config.json: palettized module {name!r} is tied to {layout.tied_to!r}, but the model does not tie "
                f"their weights (its ties: {pairs or 'none'})"
            )
        try:
            module_name, param = split_name(model, name)
            module = model.get_submodule(module_name)
        except AttributeError:
            raise PalettizedCheckpointError(
                f"config.json lists palettized module {name!r}, which this model does not have"
            ) from None
        tensor = module._parameters.get(param)
        if tensor is None or isinstance(module, DKMMixin) or param in getattr(module, "palettized_weights", {}):
            raise PalettizedCheckpointError(
                f"config.json lists palettized module {name!r}, which is not a weight of this model's "
                f"{type(module).__name__}"
            )
        if tuple(tensor.shape) != layout.shape:
            raise PalettizedCheckpointError(
                f"config.json: palettized module {name!r} has shape {list(layout.shape)}, the model's weight is "
                f"{list(tensor.shape)}"
            )
        _check_not_offloaded(module, name)
        source = done[source_name] if source_name is not None else None
        weight = PalettizedWeight(module, param, layout, tensor.dtype, source)
        weight.register(lut_dtype, tensor.device)
        PalettizedMixin.attach(module, {param: weight})
        done[name] = weight
    return done


# -- -> dense ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Every DKM / palettized weight back to a plain parameter holding the (hard-clustered or decoded) weight, every
    module back in its own class."""
    new_weights: dict[int, nn.Parameter] = {}  # id of a weight's state -> its new parameter (for tied weights)

    def dense(state) -> nn.Parameter:
        if state.tied_source is not None and id(state.tied_source) in new_weights:
            return new_weights[id(state.tied_source)]
        if state.tied_source is not None:  # its source stays clustered (`dequantize(model.lm_head)`): its own copy
            logger.warning(
                f"dkm_hf: {base_class(state.module).__name__}.{state.param} was tied to a clustered weight outside "
                "what is dequantized; it now holds a dense copy of its own, no longer tied to it"
            )
            value = state.hard_weight() if isinstance(state, DKMWeight) else state.decode()
            return nn.Parameter(value.detach().clone())
        if isinstance(state, DKMWeight):
            value = state.hard_weight() if state.dkm_enabled else state.weight
            return nn.Parameter(value.detach().clone(), requires_grad=state.weight.requires_grad)
        return nn.Parameter(state.decode().clone())

    modules = [m for _, m in model.named_modules() if isinstance(m, (DKMMixin, PalettizedMixin))]
    modules.sort(key=lambda m: any(s.tied_source is not None for s in _states(m).values()))
    for module in modules:
        params = {}
        for param, state in _states(module).items():
            params[param] = new_weights[id(state)] = dense(state)
        if isinstance(module, DKMMixin):
            module.detach_dkm()
            for param, tensor in params.items():
                module.__dict__.pop(param, None)  # no shadow outlives a forward, but none may hide the parameter
                module._parameters[param] = tensor
        else:
            module.detach_palettized(params)
    remove_parent_scopes(model)
    return model


def _states(module: nn.Module) -> dict:
    return module.dkm_weights if isinstance(module, DKMMixin) else module.palettized_weights


@contextlib.contextmanager
def plain_modules(model: nn.Module, make_weight: Callable[[PalettizedWeight], nn.Parameter]):
    """Within the context, every module holding palettized weights is back in its own class with `make_weight(w)`
    as the parameter of each palettized weight `w` (one per tie: a tied weight gets its source's); afterwards each
    is put back as it was (a Core ML export traces the plain modules)."""
    made: dict[int, nn.Parameter] = {}
    modules = [m for _, m in model.named_modules() if isinstance(m, PalettizedMixin)]
    saved = [(m, type(m), dict(m._buffers), m.palettized_weights) for m in modules]
    for _, w in sorted(palettized_modules(model), key=lambda item: item[1].tied_source is not None):
        source = w.tied_source if w.tied_source is not None else w
        made.setdefault(id(source), make_weight(source))
    try:
        for module in modules:
            states = module.palettized_weights.items()
            module.detach_palettized({p: made[id(w.tied_source or w)] for p, w in states})
        yield model
    finally:
        for module, cls, buffers, states in saved:
            for param in states:
                module._parameters.pop(param, None)
            module._buffers.clear()
            module._buffers.update(buffers)
            module.palettized_weights = states
            swap_class(module, cls)
