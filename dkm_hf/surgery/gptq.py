"""Error-compensated snapping onto the LUTs (GPTQ): a better start for DKM at low bit widths.

Post-training k-means snaps every weight to its nearest centroid independently. GPTQ (Frantar et al., 2022) snaps
the input features of a layer one at a time and spreads each snap's error over the features not yet snapped, through
the inverse of H = X^T X, the Gram matrix of the layer's inputs over a few calibration batches: the layer's output on
those inputs, not its weight, is what is kept close. `gptq_snap` does that with the centroids DKM already has (any
k-means, plain or importance-weighted): afterwards every snapped weight sits on one of its LUT's centroids, so the
hard model is what GPTQ chose, and DKM fine-tunes from there:

    model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(path), config, init=False)
    importance = dkm_hf.gradient_importance(model, batches)
    dkm_hf.init_centroids(model, importance)
    dkm_hf.gptq_snap(model, batches)            # the weights now on the centroids, errors compensated
    dkm_hf.set_importance(model, importance)    # then train as usual

It applies to the weights of Linear layers and transformers' Conv1D clustered with cluster_dim 1 (per-row, grouped
or per-tensor LUTs, per-channel scales included), whose input features are the last dimension of the layer's input.
Other weights (embeddings, convolutions, stacked experts, vectors of d > 1, weights sharing a LUT with another) are
left as they are and named in the returned report. H is float32 (features^2 per layer): the layers are taken in
chunks of at most `max_hessian_bytes` of H, each chunk with one pass over the calibration batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping

import torch
from torch import nn
from transformers.utils import logging

from ..nn.dkm import DKMWeight, dkm_modules
from ..nn.weights import is_whole
from ..ops import fused
from .importance import _to, check_in_memory, dense_eval

logger = logging.get_logger(__name__)


@torch.no_grad()
def snap_rows(
    rows: torch.Tensor,
    lut: torch.Tensor,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    factor: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """GPTQ of one weight seen as (channels, features) rows onto per-channel value sets: the index of each weight's
    value, (C, F) int64. `factor`: `inverse_factor(hessian, damp, act_order)` where several weights share one H.

    rows (C, F) float32; lut (C, k): the values each channel may take; hessian (F, F): X^T X of the inputs.
    Feature j is snapped to each channel's nearest value, and the error e = (w_j - q_j) / U_jj updates the features
    after it by -e U_j,j+1: (U: the upper Cholesky factor of (H + damp mean(diag H) I)^-1). Features that never see
    an input (H_jj = 0, taken as the other features' mean, so that the result does not depend on the inputs' scale)
    are snapped to their nearest value and spread nothing. `act_order`: the features in the order of decreasing
    H_jj (the inputs of most energy first, while the most features are left to take their error).
    When H + damping is not positive definite in float32, the damping is raised tenfold up to three times (from 1e-4
    when `damp` is 0) before a ValueError."""
    _check_options(damp, block_size)
    w = rows.detach().float().clone()
    u, order = factor if factor is not None else inverse_factor(hessian, damp, act_order)
    if order is not None:
        w = w[:, order]
    features = w.shape[1]
    out = torch.empty(w.shape, dtype=torch.long, device=w.device)
    lut = lut.float().contiguous()
    kernels = fused.cpu_kernels() if w.device.type == "cpu" else None
    for start in range(0, features, block_size):
        end = min(start + block_size, features)
        u_block = u[start:end, start:end]
        if kernels is not None:  # the loop below in C++ (dkm_gptq.cpp), the same float operations
            block = w[:, start:end].contiguous()
            out[:, start:end], errors = kernels.gptq_block(block, lut, u_block.contiguous())
        else:
            block, errors = w[:, start:end], torch.empty_like(w[:, start:end])
            for j in range(end - start):
                column = block[:, j]
                nearest = (column[:, None] - lut).abs().argmin(1, keepdim=True)
                snapped = lut.gather(1, nearest).squeeze(1)
                out[:, start + j] = nearest.squeeze(1)
                error = (column - snapped) / u_block[j, j]
                block[:, j:].sub_(error[:, None] * u_block[j, j:][None, :])
                errors[:, j] = error
        w[:, end:].sub_(errors @ u[start:end, end:])
    if order is not None:
        out = torch.empty_like(out).index_copy_(1, order, out)
    return out


@torch.no_grad()
def inverse_factor(
    hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(U, order) of `snap_rows`: U the upper Cholesky factor of (H + damping)^-1 in the features' snapping order,
    `order` that order (None: as stored). Weights fed the same input (q / k / v) share it."""
    _check_options(damp, 1)
    h = hessian.detach().float().clone()
    features = h.shape[0]
    order = None
    if act_order:
        order = h.diagonal().argsort(descending=True)
        h = h[order][:, order]
    diagonal = h.diagonal()
    dead = diagonal == 0
    # the live inputs' scale, not 1.0: the damping (a fraction of the mean diagonal) stays relative to the inputs
    diagonal[dead] = diagonal[~dead].mean() if bool((~dead).any()) else 1.0
    mean = diagonal.mean()
    u = None
    # more damping when H (+ damping) is not positive definite in float32
    levels = [damp] + [(damp or 1e-5) * 10**attempt for attempt in (1, 2, 3)]
    for level in levels:
        h_damped = h + torch.eye(features, dtype=h.dtype, device=h.device) * (level * mean)
        factor, info = torch.linalg.cholesky_ex(h_damped)
        if not bool(info):  # one sync per weight, outside any training loop
            inverse = torch.cholesky_inverse(factor)
            u, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info):
                break
            u = None
    if u is None:
        raise ValueError(
            f"the inputs' Gram matrix is not positive definite even with {levels[-1]:g} x its mean diagonal added"
        )
    return u, order


def _check_options(damp: float, block_size: int, max_hessian_bytes: int = 1) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"gptq_snap: damp must be a number >= 0 (a fraction of H's mean diagonal), got {damp!r}")
    for name, value in (("block_size", block_size), ("max_hessian_bytes", max_hessian_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"gptq_snap: {name} must be a positive int, got {value!r}")


def _supported(state: DKMWeight, tied: set[int]) -> str | None:
    """Why `state` cannot be snapped by GPTQ, or None."""
    layout = state.layout
    if id(state) in tied or state.tied_source is not None:
        return "shares its LUT with another weight"
    if layout.channel_dims != 1:
        return "stacked experts (a LUT per expert and row)"
    if state.param != "weight" or not (isinstance(state.module, nn.Linear) or layout.transposed):
        return "not the weight of a Linear or Conv1D"
    if layout.cluster_dim != 1:
        return "vectors of d > 1"
    return None


def _value_sets(state: DKMWeight) -> torch.Tensor:
    """(channels, k) float32: the values each channel's weights may take, as the palettized weight stores them (its
    group's centroids and its scale rounded to the LUT's dtype), so that the hard model is the snapped weight."""
    layout, lut_dtype = state.layout, state.settings.lut_torch_dtype
    lut = state.centroids[..., 0].to(lut_dtype).float()  # (groups, k)
    values = lut.repeat_interleave(layout.channels // layout.groups, dim=0)
    if layout.per_channel_scale:
        values = values * state.weight_scale.to(lut_dtype).float()
    return values


def _first_tensor(args: tuple, kwargs: Mapping) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def gptq_snap(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    max_hessian_bytes: int = 2**31,
    act_order: bool = False,
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Snap the weights of `model`'s Linear / Conv1D DKM weights onto their centroids with GPTQ's error compensation
    (see the module's docstring); returns {name: why it was left as it was} for the DKM weights not snapped.

    `batches`: a re-iterable of dicts of model inputs (tensors are moved to the model's device; labels are harmless),
    or of anything `forward(model, batch)` runs the model on; the model runs in eval mode with its clustering off
    (the dense weights' inputs), under no_grad, its output head (a language model's logits) only on the first batch;
    its mode and clustering flags are restored. A dict batch's 2-D `attention_mask` leaves its padded positions out
    of the Gram matrices of the layers whose inputs are (batch, tokens, features). Run it after the centroids
    are initialised (`init_centroids`) and before training. `damp`: the fraction of H's mean diagonal added to it (0:
    none, unless H is singular; see `snap_rows`).

    `hessians`: a dict kept between calls on models of the same dense weights (e.g. one per bit width): the Gram
    matrices it holds (by weight name) are used instead of a pass over the batches, and those computed are added to
    it, so a second call with every name in it runs no forward pass (and may be given no batches). The caller owns
    it (its size: features^2 float32 per weight) and drops it when done."""
    _check_options(damp, block_size, max_hessian_bytes)
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    states = dkm_modules(model)
    if not states:
        raise ValueError("gptq_snap() needs a model with DKM modules (dkm_config= / quantization_config= / prepare())")
    check_in_memory(model, "gptq_snap", batches, forward)
    not_ready = [name for name, state in states if state.tied_source is None and not state.dkm_ready]
    if not_ready:
        raise ValueError(f"gptq_snap: initialise the centroids first (init_centroids); not ready: {not_ready[:3]}")
    sharded = [name for name, state in states if not is_whole(state.weight)]
    if sharded:
        raise ValueError(f"gptq_snap: run it before FSDP2's fully_shard; these weights are sharded: {sharded[:3]}")
    tied = {id(state.tied_source) for _, state in states if state.tied_source is not None}
    skipped = {name: why for name, state in states if (why := _supported(state, tied)) is not None}
    todo = [(name, state) for name, state in states if name not in skipped]
    if hessians is not None and not isinstance(hessians, MutableMapping):
        raise ValueError(f"gptq_snap: `hessians` must be a dict of weight name -> Gram matrix, got {type(hessians)}")
    cached = {} if hessians is None else hessians
    for name, state in todo:
        given = cached.get(name)
        if given is not None and not (
            isinstance(given, torch.Tensor) and tuple(given.shape) == (state.layout.features,) * 2
        ):
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(
                f"gptq_snap: hessians[{name!r}] is {shape}, not the ({state.layout.features}, "
                f"{state.layout.features}) Gram matrix of the weight's input features: from another model"
            )
        if given is not None and not bool(torch.isfinite(given).all()):
            raise ValueError(f"gptq_snap: hessians[{name!r}] has non-finite values (inf or nan)")
    if not batches and any(name not in cached for name, _ in todo):
        raise ValueError("gptq_snap: `batches` gave no batch")
    chunks: list[list[tuple[str, DKMWeight]]] = [[]]
    used = 0  # bytes of H in the last chunk
    for name, state in todo:
        if name in cached:
            continue
        size = 4 * state.layout.features**2
        if chunks[-1] and used + size > max_hessian_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append((name, state))
        used += size
    device = next(model.parameters()).device
    with dense_eval(model):
        # every chunk sees the dense model's inputs: the choices (one byte per weight, with each row's values) are
        # kept until all are made
        chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ready = [(name, state) for name, state in todo if name in cached]  # no pass over the batches for these
        for chunk in ([ready] if ready else []) + [c for c in chunks if c]:
            if chunk is ready:
                grams = {name: cached[name] for name, _ in chunk}
            else:
                grams = _grams(model, chunk, batches, forward, device)
                if hessians is not None:
                    hessians.update(grams)
            shared = None  # (H, its factor): q / k / v and gate / up have equal Gram matrices, factored once
            for name, state in chunk:
                if name not in grams:
                    skipped[name] = "saw no input in the calibration batches"
                    continue
                rows, values = state.layout.to_rows(state.weight.detach()).float(), _value_sets(state)
                hessian = grams.pop(name).to(rows.device)
                try:
                    if shared is None or shared[0].shape != hessian.shape or not torch.equal(shared[0], hessian):
                        shared = (hessian, inverse_factor(hessian, damp, act_order))
                    indices = snap_rows(rows, values, hessian, damp, block_size, act_order, shared[1])
                except ValueError as error:  # nothing has changed yet: the choices are applied after all are made
                    raise ValueError(f"gptq_snap: {name}: {error}") from None
                chosen[name] = (indices.to(torch.uint8 if state.layout.n_clusters <= 256 else torch.int16), values)
        for name, state in todo:
            if name in chosen:
                indices, values = chosen.pop(name)
                snapped = values.gather(1, indices.long())
                with torch.no_grad():  # a write autograd's saved-tensor checks see (a forward awaiting backward)
                    state.weight.copy_(state.layout.from_rows(snapped).to(state.weight.dtype))
    logger.info(f"dkm_hf: gptq_snap snapped {len(states) - len(skipped)} of {len(states)} DKM weights")
    return skipped


def _output_head(model: nn.Module) -> nn.Module | None:
    try:  # some models' get_output_embeddings raise instead of returning None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


class _HeadReached(Exception):
    """Raised before the output head: the layers' inputs are collected, the logits are not needed."""


@torch.no_grad()
def _grams(model, chunk, batches, forward, device) -> dict[str, torch.Tensor]:
    """X^T X (float32) of the inputs of every layer in `chunk` over `batches`, {name: (features, features)}. Layers
    fed the same tensor in one forward pass (q / k / v, gate / up) share one product per batch. The model's output
    head (`get_output_embeddings()`, a language model's vocabulary projection), when not in `chunk`, is not run after
    the first batch has shown that no layer of `chunk` runs after it: its logits (batch x tokens x vocabulary, a fifth
    of SmolLM2's forward pass) are not needed."""
    grams: dict[str, torch.Tensor] = {}
    products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(input) -> (input, X^T X), for one batch
    head = _output_head(model)
    head = head if head is not None and all(s.module is not head for _, s in chunk) else None
    state = {"head_ran": False, "after_head": False, "stop": False, "mask": None}

    def hook_for(name: str, dkm_state: DKMWeight):
        def hook(module, args, kwargs):
            state["after_head"] |= state["head_ran"]
            x = _first_tensor(args, kwargs)
            if x is None or x.shape[-1] != dkm_state.layout.features:
                raise ValueError(
                    f"gptq_snap: {name}'s input does not end in its {dkm_state.layout.features} input features "
                    f"(got {None if x is None else tuple(x.shape)})"
                )
            seen = products.get(id(x))
            if seen is None or seen[0] is not x:
                mask = state["mask"]
                rows = math.prod(x.shape[:-1])
                if mask is not None and rows == mask.numel():
                    # (batch, tokens, features), or flattened to (batch * tokens, features) (a shared expert's input)
                    keep = mask.to(x.device, torch.bool).reshape(-1)
                    flat = x.detach().reshape(rows, x.shape[-1])[keep].float()
                else:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                seen = products[id(x)] = (x, flat.t() @ flat)
            if name in grams:
                grams[name].add_(seen[1])
            else:
                grams[name] = seen[1].clone()

        return hook

    def head_hook(module, args):
        state["head_ran"] = True
        if state["stop"]:
            raise _HeadReached

    handles = [s.module.register_forward_pre_hook(hook_for(n, s), with_kwargs=True) for n, s in chunk]
    if head is not None:
        handles.append(head.register_forward_pre_hook(head_hook))
    try:
        for index, batch in enumerate(batches):
            products.clear()
            state["head_ran"] = False
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            state["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            try:
                if forward is not None:
                    forward(model, batch)
                else:
                    model(**_to(batch, device))
            except _HeadReached:
                pass
            if index == 0:  # from the second batch on, stop at the head if the first ran it after every layer
                state["stop"] = state["head_ran"] and not state["after_head"]
    finally:
        products.clear()
        for handle in handles:
            handle.remove()
    return grams
