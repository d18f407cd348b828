"""A bit width per weight at the size of one width for all (mixed-bit palettization): `allocate_bits`.

Layers do not lose the same by clustering: in SmolLM2 the attention's value and output projections and the first
and last layers' MLPs lose far more at 3 bits than the middle layers' queries. With the importance of every weight
(`gradient_importance`, the diagonal Fisher information F), the loss that snapping a weight W to the k-means
centroids q_b(W) of width b adds is, to second order, proportional to its sensitivity

    s(W, b) = sum F (W - q_b(W))^2        (q_b: the importance-weighted k-means `init_centroids` runs)

and the widths that minimise the summed sensitivity within a size are the solution of a knapsack. A Lagrangian search
comes close: each weight takes the width minimising s(W, b) + lambda * bytes(W, b), lambda the smallest that fits;
the bytes that solution leaves are then spent on the widenings that lower the sum most per byte (without that pass a
budget width outside the choices, 2 or 4 bits at the size of 3, left 21% of a tiny Mixtral's size unused).

    model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(path), config, init=False)
    importance = dkm_hf.gradient_importance(model, batches)
    config = dkm_hf.allocate_bits(model, importance, choices=(2, 3, 4))   # the size of config.bits for all
    model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(path), config, init=False)
    dkm_hf.init_centroids(model, importance)                              # then train as usual
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..config import DKMConfig, name_matches
from ..nn.dkm import DKMWeight, dkm_modules
from ..ops.kmeans import kmeans_init_many
from .convert import kmeans_batches
from .importance import _owners
from .model import get_dkm_config
from .select import check_clusterable


def allocate_bits(
    model: nn.Module,
    importance: Mapping[str, torch.Tensor],
    choices: Iterable[int],
    budget_bits: int | None = None,
    restarts: int | None = None,
) -> DKMConfig:
    """A copy of the model's DKMConfig whose overrides give each weight of the default width `config.bits` a width
    from `choices`, chosen to minimise the summed sensitivity (the module docstring) with the palettized size of
    those weights (indices and LUTs) at most what `budget_bits` (default: `config.bits`) gives them all: the
    Lagrangian solution, then the bytes it leaves spent on the widenings that lower the sensitivity most per byte.

    `model`: prepared with the config (`dkm_hf.prepare(..., init=False)` is enough: only its layouts and weights are
    read, nothing of it is changed). `importance`: `gradient_importance(model, ...)`; a weight whose importance is
    all zero has the same (zero) sensitivity at every width and takes the narrowest (an importance zero everywhere
    is refused). Weights an override gives a width of their own and weights without an importance keep theirs; a
    weight tied to an allocated one follows it (an override of its own name is written where one of the config's
    matches it alone). `restarts`: k-means runs per LUT and width (default: the config's `kmeans_restarts`; the
    sensitivities need less precision than the initialisation, and 1 costs a quarter of 4). Prepare the dense model
    again with the returned config; the importance's names are the same, so
    `init_centroids(model, importance)` and `set_importance` take it as it is.
    """
    config = get_dkm_config(model)
    if config is None or not dkm_modules(model):
        raise ValueError(
            "allocate_bits() needs a model prepared for DKM (dkm_config= / quantization_config= / prepare()), not "
            "a dense or palettized one"
        )
    given = choices
    try:
        choices = None if isinstance(choices, (numbers.Number, str)) else list(choices)  # a generator is read once
    except TypeError:  # not iterable
        choices = None
    if choices is None or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in choices):
        raise ValueError(f"allocate_bits: choices must be bit widths such as (2, 3, 4), but got {given!r}")
    choices = sorted({int(b) for b in choices})  # NumPy's integers too
    budget_bits = config.bits if budget_bits is None else budget_bits
    for name, value in [("choices", b) for b in choices] + [("budget_bits", budget_bits)]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 8:
            raise ValueError(f"allocate_bits: {name} must be bit widths in [1, 8], but got {value!r}")
    budget_bits = int(budget_bits)
    if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1):
        raise ValueError(f"allocate_bits: restarts must be an integer >= 1, but got {restarts!r}")
    if not choices:
        raise ValueError("allocate_bits: no width to choose from (choices is empty)")
    states = dict(dkm_modules(model))
    owners = zip(importance, _owners(model, importance))  # checked: names, shapes
    free = {
        name: (state, f)
        for name, (state, f) in owners
        if states[name].tied_source is None and "bits" not in config._resolve(name)[1]
    }
    if not free:
        raise ValueError(f"allocate_bits: no weight of the default width {config.bits} with an importance to allocate")
    if not any(bool(f.any()) for _, f in free.values()):
        raise ValueError(
            "allocate_bits: the importance is zero for every weight to allocate (no gradient reached them: labels all "
            "-100, or a loss that does not depend on them?), which would put every weight at the narrowest width"
        )
    for name, (state, _) in free.items():
        check_clusterable(name, state.weight, state.settings.lut_torch_dtype)
    sizes = {name: {b: _bytes(state, b) for b in choices} for name, (state, _) in free.items()}
    budget = sum(_bytes(state, budget_bits) for state, _ in free.values())
    if sum(min(s.values()) for s in sizes.values()) > budget:
        raise ValueError(f"allocate_bits: even the narrowest of {choices} is larger than {budget_bits} bits for all")
    errors = sensitivities(free, choices, restarts)
    widths = _spend(errors, sizes, budget, _search(errors, sizes, budget))
    name_of = {id(state): name for name, state in states.items()}
    # a tied weight follows its source; an override of its own name is written only where one of the config's
    # matches it alone (its settings must equal the source's, `select._check_tied_overrides`)
    sources = {name: name_of.get(id(state.tied_source)) for name, state in states.items() if state.tied_source}
    widths |= {
        name: widths[source]
        for name, source in sources.items()
        if source in widths and any(name_matches(p, name) and not name_matches(p, source) for p in config.overrides)
    }
    result = copy.deepcopy(config)
    result.overrides = dict(config.overrides)
    for name, bits in widths.items():
        if bits != states[name].layout.bits:
            pattern = _exact(name, states)
            result.overrides[pattern] = {**config.overrides.get(pattern, {}), "bits": bits}
    result.post_init()
    return result


def _exact(name: str, names: Iterable[str]) -> str:
    """A pattern that matches weight `name` only: the name itself, or as an escaped regex where the name also
    matches another (a name ends another after a dot, or a dot stands for another character) or is no regex."""
    try:
        re.compile(name)
        if not any(other != name and name_matches(name, other) for other in names):
            return name
    except re.error:  # a module name that is no regex (a ModuleDict key "w[")
        pass
    return f"(?:{re.escape(name)})"


def _bytes(state: DKMWeight, bits: int) -> int:
    layout = dataclasses.replace(state.layout, bits=bits)
    return layout.packed_bytes + math.prod(layout.lut_shape) * state.settings.lut_torch_dtype.itemsize


@torch.no_grad()
def sensitivities(
    weights: Mapping[str, tuple[DKMWeight, torch.Tensor]], choices: list[int], restarts: int | None = None
) -> dict[str, dict]:
    """{name: {width: sum F (W - q_b(W))^2}} for `weights` ({name: (DKM weight, importance)}): the weighted k-means
    of each width, run as `init_centroids` runs it (the weights of one seed and restart count batched; `restarts`
    replaces each weight's own count), and the hard weight of its centroids (`DKMWeight.snapped`)."""
    errors: dict[str, dict[int, float]] = {name: {} for name in weights}
    name_of = {id(state): name for name, (state, _) in weights.items()}
    key = lambda s: (s.dkm_seed, restarts or s.settings.kmeans_restarts)  # noqa: E731
    for (seed, runs), states in kmeans_batches([state for state, _ in weights.values()], key):
        # the scales initialisation would set, computed aside: the model's own buffers are left as they are
        scales = [s.layout.initial_scale(s.weight) if s.layout.per_channel_scale else None for s in states]
        vectors = [state.vectors(scale=scale) for state, scale in zip(states, scales)]
        factors = [state.importance_vectors(weights[name_of[id(state)]][1]) for state in states]
        for bits in choices:
            found = kmeans_init_many(vectors, 2**bits, seed=seed, restarts=runs, importance=factors)
            for state, v, c, scale in zip(states, vectors, found, scales):
                f = weights[name_of[id(state)]][1]
                error = f.to(v.device).float() * (state.weight.float() - state.snapped(v, c, scale).float()).square()
                errors[name_of[id(state)]][bits] = float(error.sum())
    return errors


def _spend(
    errors: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int, widths: dict[str, int]
) -> dict[str, int]:
    """`widths` with the bytes they leave under `budget` spent greedily: the widening (to any wider width) that
    lowers the summed error most per byte and fits, until none does."""
    widths, left = dict(widths), budget - sum(sizes[name][b] for name, b in widths.items())
    while True:
        best, gain = None, 0.0
        for name, b in widths.items():
            for wider in (c for c in errors[name] if c > b and sizes[name][c] - sizes[name][b] <= left):
                rate = (errors[name][b] - errors[name][wider]) / (sizes[name][wider] - sizes[name][b])
                if rate > gain:
                    best, gain = (name, wider), rate
        if best is None:
            return widths
        name, wider = best
        left -= sizes[name][wider] - sizes[name][widths[name]]
        widths[name] = wider


def _search(errors: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """The widths minimising the summed error + lambda * bytes for the smallest lambda whose total fits `budget`."""

    def pick(lam: float) -> dict[str, int]:
        return {name: min(e, key=lambda b: (e[b] + lam * sizes[name][b], b)) for name, e in errors.items()}

    def total(widths: dict[str, int]) -> int:
        return sum(sizes[name][b] for name, b in widths.items())

    if total(pick(0.0)) <= budget:
        return pick(0.0)
    low, high = 0.0, 1e-30
    while total(pick(high)) > budget:  # the narrowest widths fit (checked by the caller): this ends
        low, high = high, high * 16
    for _ in range(200):  # bisection on a log scale: the errors span many orders of magnitude
        middle = math.sqrt(low * high) if low > 0 else high / 16
        if middle in (low, high):
            break
        low, high = (middle, high) if total(pick(middle)) > budget else (low, middle)
    return pick(high)
