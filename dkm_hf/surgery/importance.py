"""How much the loss cares about each weight: the importance that weighs the k-means of `init_centroids`.

A per-row 4-bit LUT has 16 entries for 576-8,192 weights; plain k-means spends them on where the weights are dense,
while a few weights the loss is sensitive to (outlier channels' inputs) sit between centroids. SqueezeLLM (Kim et al.,
2023) weighs each weight by the diagonal of the Fisher information, the squared gradient of the loss summed over a
few calibration batches, and clusters with those weights. `gradient_importance` computes it on the dense weights of a
DKM model (its clustering off for the pass), `dkm_hf.init_centroids(model, importance=...)` re-runs the k-means with
it, and `dkm_hf.set_importance(model, importance)` weighs DKM's own centroid update the same way during training
(C = A^T (f w) / A^T f; without it the unweighted update drifts the centroids back to plain k-means' within a few
steps):

    model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(path), config, init=False)  # no plain k-means
    importance = dkm_hf.gradient_importance(model, batches)   # e.g. 16 training batches
    dkm_hf.init_centroids(model, importance=importance)
    dkm_hf.set_importance(model, importance)                  # then train as usual

The weighted loop runs in the fused kernels (C++ on CPU, Triton on CUDA; 1.08-1.11x their plain loop's time on
SmolLM2's per-row layers, `benchmarks/fused_kernels.py --importance`), else the chunked torch path. The 16-bit buckets
of the uniquified path have no per-weight factors, so a large per-tensor LUT (an 8-bit embedding) weighted gives up
that path for the fused kernel's work per weight and centroid: give it the weights with small LUTs (per-row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..nn.dkm import DKMWeight, dkm_modules
from ..ops.kmeans import sample_weights
from .convert import kmeans_all


def _to(batch, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def check_in_memory(model: nn.Module, caller: str, batches: Iterable, forward: object) -> None:
    """The checks `gradient_importance` and `gptq_snap` make before anything changes: weights in memory (not on
    the meta device, not offloaded by accelerate's hooks) and dict batches unless a function runs them."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    offloaded = [n for n, m in model.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    if meta or offloaded:
        raise ValueError(
            f"{caller} needs the model's weights in memory; {(meta or offloaded)[:3]} are on the meta device or "
            "offloaded by accelerate (device_map / cpu_offload): load the model without offloading"
        )
    if forward is None and isinstance(batches, (list, tuple)):
        bad = next((type(b).__name__ for b in batches if not isinstance(b, Mapping)), None)
        if bad is not None:
            raise ValueError(
                f"{caller}: batches must be dicts of model inputs, got a {bad}; pass a function that runs the model "
                "on one batch for any other kind"
            )


@contextlib.contextmanager
def dense_eval(model: nn.Module) -> Iterator[None]:
    """Within the context the model computes with its dense weights (every DKM weight's clustering off) in eval mode;
    afterwards every module's mode and every clustering flag are as they were (a DKM weight's cached hard weight is
    dropped on the way in and out)."""
    flags = [(state, state.dkm_enabled) for _, state in dkm_modules(model)]
    modes = [(module, module.training) for module in model.modules()]
    try:
        for state, _ in flags:
            state.dkm_enabled = False
            state.forget()
        model.eval()
        yield
    finally:
        for state, enabled in flags:
            state.dkm_enabled = enabled
            state.forget()
        for module, mode in modes:
            module.training = mode


def gradient_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The sum over `batches` of the squared gradient of the loss with respect to every DKM weight that owns its
    centroids (the diagonal Fisher information), computed with the dense weights: {name as `dkm_modules` names it:
    a float32 tensor of the weight's shape}, one float32 copy of the clustered weights in memory.

    Each batch is a dict of model inputs with labels (tensors are moved to the model's device), or anything
    `loss_fn(model, batch)` turns into a scalar loss. The model runs in eval mode (no dropout) with its clustering
    off; afterwards its mode, clustering flags, `requires_grad` flags and `.grad` tensors are as they were.
    """
    states = [(name, state) for name, state in dkm_modules(model) if state.tied_source is None]
    if not states:
        raise ValueError("gradient_importance: the model has no DKM-clustered weight (dkm_config= / prepare())")
    check_in_memory(model, "gradient_importance", batches, loss_fn)
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    clustered = {id(state.weight) for _, state in states}
    sums = {
        name: torch.zeros(state.weight.shape, dtype=torch.float32, device=state.weight.device)
        for name, state in states
    }
    device = params[0].device
    count = 0
    try:
        for p in params:  # only the clustered weights' gradients are computed
            p.requires_grad_(id(p) in clustered)
            p.grad = None
        with dense_eval(model):
            for batch in batches:
                if loss_fn is None and not isinstance(batch, Mapping):
                    raise ValueError(
                        f"gradient_importance: a batch is a {type(batch).__name__}, not a dict; pass loss_fn"
                    )
                with torch.inference_mode(False), torch.enable_grad():  # also under no_grad / inference_mode
                    if loss_fn is not None:
                        loss = loss_fn(model, batch)
                    else:
                        loss = getattr(model(**_to(batch, device)), "loss", None)
                        if loss is None:
                            raise ValueError(
                                "gradient_importance: the model returned no loss; give batches with labels or a "
                                "loss_fn"
                            )
                    loss.backward()
                for name, state in states:
                    grad = state.weight.grad
                    if grad is not None:
                        sums[name].add_(grad.float().square())
                        state.weight.grad = None
                count += 1
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    if count == 0:
        raise ValueError("gradient_importance: `batches` gave no batch")
    if not any(bool(f.any()) for f in sums.values()):
        raise ValueError(
            f"gradient_importance: every gradient of the clustered weights was zero over {count} batch(es) (labels "
            "all -100, or a loss that does not depend on them?): an importance of zeros weighs nothing"
        )
    return sums


def init_centroids(model: nn.Module, importance: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Re-run the k-means initialisation of every DKM weight of `model` from its current weight (as loading with a
    DKMConfig did), each value counted by its `importance` where given (`gradient_importance`); returns the model.
    Checkpoints keep the centroids: run it before training, not on a model whose training is to be resumed."""
    if not dkm_modules(model):
        raise ValueError(
            "init_centroids() needs a model with DKM modules (dkm_config= / quantization_config= / prepare())"
        )
    owners = [] if importance is None else _owners(model, importance)
    kmeans_all(model, {id(state): state.importance_vectors(f) for state, f in owners})
    return model


def _owners(model: nn.Module, importance: Mapping[str, torch.Tensor]) -> list[tuple[DKMWeight, torch.Tensor]]:
    """(the DKM weight that owns the centroids, its importance) per entry; unknown names refused by name."""
    states = dict(dkm_modules(model))
    unknown = sorted(set(importance) - set(states))
    if unknown:
        raise ValueError(f"importance names weights that are not DKM-clustered in this model: {unknown[:5]}")
    owners = []
    for name, f in importance.items():  # all checked before the caller changes anything
        state = states[name].tied_source or states[name]
        if not isinstance(f, torch.Tensor):
            raise ValueError(f"importance[{name!r}] is a {type(f).__name__}, not a tensor")
        if tuple(f.shape) != tuple(state.weight.shape):  # a transpose has the right count and the wrong layout
            raise ValueError(f"importance[{name!r}] is {tuple(f.shape)}, not the weight's {tuple(state.weight.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"importance[{name!r}] has non-finite values (inf or nan)")
        if bool((f < 0).any()):
            raise ValueError(f"importance[{name!r}] has negative values (an importance is a sum of squares)")
        owners.append((state, f))
    return owners


def set_importance(model: nn.Module, importance: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Weigh the DKM loop of the named weights by their importance (`gradient_importance`): each centroid update is
    the importance-weighted mean C = A^T (f w) / A^T f, f = `ops.kmeans.sample_weights` of the importance (kept as one
    float32 value per weight, not saved in checkpoints); the other weights run the plain loop. `None` makes every
    loop plain again. Returns the model. Validated before anything changes."""
    if not dkm_modules(model):
        raise ValueError(
            "set_importance() needs a model with DKM modules (dkm_config= / quantization_config= / prepare())"
        )
    owners = [] if importance is None else _owners(model, importance)
    with torch.inference_mode(False):  # kept and read in training: never inference tensors
        vectors = [(state, sample_weights(state.importance_vectors(f).sum(-1))) for state, f in owners]
    for _, state in dkm_modules(model):
        state.importance = None
        state.forget()
    for state, f in vectors:
        state.importance = f
    return model
