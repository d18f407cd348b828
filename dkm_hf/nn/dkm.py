"""Training-time DKM modules: drop-in variants of every registered type (Linear, Conv, Conv1D, Embedding).

A DKM module keeps its float `weight` parameter (the optimiser trains it as usual) and a float32 `centroids` buffer
(groups, 2**bits, cluster_dim) carried from step to step. In `train()` its forward uses the soft-clustered weight
W~ = A C (differentiable); in `eval()` the hard weight (each vector snapped to its nearest centroid, rounded to the
LUT dtype: exactly what the palettized checkpoint will hold), cached until the weight or the centroids change.

One soft weight per step. The soft weight is computed once and reused until its gradient has been computed (or the
weight, the centroids or tau change), so a weight used twice in one forward (tied embeddings, a shared layer, a
layer recomputed by activation checkpointing) costs one DKM pass and every use sees the same tensor. The centroids
advance only in forwards that record gradients; a `no_grad` forward in train mode reads them without moving them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import gather_centroids, hard_assign
from ..ops.buckets import bucket_dtype_for
from ..ops.dkm import dkm_cluster
from ..ops.kmeans import kmeans_init
from .layout import ClusterSettings, Layout
from .registry import apply_keeping_dtype, functional_forward, module_type, set_tie, swap_class, variant_class

# With at least this many weights per LUT group, cluster_dim 1 uses the uniquified path (benchmarks/dkm_paths.py).
UNIQUIFY_MIN_WEIGHTS = 1 << 13
STATE_BUFFERS = ("centroids", "weight_scale")  # float32, whatever the weight's dtype
_ATTRS = ("layout", "settings", "dkm_seed", "dkm_enabled", "dkm_ready", "soft_eval", "tied_source", "_soft", "_hard")
_SCALE_FLOOR = 1e-12
_VAR_FLOOR = 1e-24


def _pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    return tensor, tensor._version


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    tensor, version = packed
    if tensor._version != version:  # the check autograd makes for the tensors it saves itself
        raise RuntimeError(
            f"a tensor of shape {tuple(tensor.shape)} saved by the DKM loop for backward was modified in place "
            "before backward ran (e.g. the weight or the centroids changed between forward and backward)"
        )
    return tensor


class DKMMixin:
    """The DKM state and logic shared by every clustered module type."""

    prefix = "DKM"
    layout: Layout
    settings: ClusterSettings
    centroids: torch.Tensor
    tied_source: DKMMixin | None

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        layout: Layout,
        settings: ClusterSettings,
        seed: int = 0,
        tied_source: DKMMixin | None = None,
        with_state: bool = True,
    ) -> DKMMixin:
        """The DKM variant of `module`, sharing its parameters. `with_state=False` registers no centroid buffers yet
        (a dense checkpoint is about to load: `init_centroids` creates them from the loaded weights)."""
        new = swap_class(module, variant_class(cls, module_type(module).base))
        new.layout, new.settings, new.dkm_seed = layout, settings, seed
        new.dkm_enabled, new.dkm_ready, new.soft_eval = True, tied_source is not None, False
        new._soft = new._hard = None  # (cache key, weight)
        set_tie(new, tied_source)
        if tied_source is None and with_state:
            new._register_state()
        return new

    def unwrap(self) -> nn.Module:
        """The plain module of the registered type, sharing this one's parameters, without any DKM state."""
        return swap_class(self, module_type(self).base, STATE_BUFFERS, _ATTRS)

    def _register_state(self) -> None:
        options = {"device": self.weight.device, "dtype": torch.float32}
        self.register_buffer("centroids", torch.zeros(self.layout.lut_shape, **options))
        if self.layout.per_channel_scale:
            self.register_buffer("weight_scale", torch.ones(self.layout.scale_shape, **options))

    def drop_state(self) -> None:
        """Forget the centroids (and scales): the next `init_centroids` makes them from the weight."""
        for name in STATE_BUFFERS:
            self._buffers.pop(name, None)
        self.dkm_ready = self.tied_source is not None
        self._soft = self._hard = None

    def _apply(self, fn, recurse=True):
        apply_keeping_dtype(self, fn, STATE_BUFFERS, lambda f: super(DKMMixin, self)._apply(f, recurse))
        self._soft = self._hard = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "centroids" in state_dict:
            self.dkm_ready = True
            self._soft = self._hard = None

    def train(self, mode: bool = True):
        # Fused optimisers update weights without bumping their version counter: a mode switch (the boundary
        # between training and evaluation) always drops the cached weights.
        self._soft = self._hard = None
        return super().train(mode)

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def implementation(self) -> str:
        if self.settings.implementation != "auto":
            return self.settings.implementation
        big = self.layout.vectors_per_group >= UNIQUIFY_MIN_WEIGHTS
        return "uniquified" if self.layout.cluster_dim == 1 and big else "chunked"

    def vectors(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The (groups, n, d) float32 vectors that are clustered (divided by the per-channel scale if any), of the
        module's weight (detached) or of `weight`."""
        rows = self.layout.to_rows((self.weight.detach() if weight is None else weight).float())
        if self.layout.per_channel_scale:
            rows = rows / self.weight_scale
        return self.layout.to_vectors(rows)

    @torch.no_grad()
    def init_centroids(self, seed: int | None = None) -> None:
        """(Re)initialise the centroids (and per-channel scales) from the current weight: k-means++ then Lloyd."""
        if self.tied_source is not None:
            return
        seed = self.dkm_seed if seed is None else seed
        restarts = self.settings.kmeans_restarts
        self.set_centroids(kmeans_init(self.init_vectors(), self.layout.n_clusters, seed=seed, restarts=restarts))

    @torch.no_grad()
    def init_vectors(self) -> torch.Tensor:
        """The first half of `init_centroids` (the k-means of many modules runs batched in between): creates the
        state, sets the per-channel scales from the weight, returns the vectors to cluster."""
        if "centroids" not in self._buffers:
            self._register_state()
        if self.layout.per_channel_scale:
            rows = self.layout.to_rows(self.weight.detach().float())
            self.weight_scale.copy_(rows.abs().amax(1, keepdim=True).clamp_min(_SCALE_FLOOR))
        return self.vectors()

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """The second half of `init_centroids`: take `centroids` (the module's LUT shape) as the current ones."""
        self.centroids.copy_(centroids.to(self.centroids.device))
        self.dkm_ready = True
        self._soft = self._hard = None

    # -- weights ---------------------------------------------------------------------------------------------------
    def clustered_weight(self) -> torch.Tensor:
        """The weight the forward uses: soft-clustered in train(), hard-assigned in eval(), dense if disabled."""
        if self.tied_source is not None:
            return self.tied_source.clustered_weight().view(self.weight.shape)
        if not self.dkm_enabled:
            return self.weight
        if not self.dkm_ready:
            self.init_centroids()
        if self.training:
            return self.soft_weight()
        return self.soft_weight(update=False) if self.soft_eval else self.hard_weight()

    def _soft_key(self) -> tuple:
        w, c, s = self.weight, self.centroids, self.settings
        return (w._version, w.data_ptr(), c._version, c.data_ptr(), s.tau, s.tau_scale, s.epsilon, s.max_iters)

    def temperature(self, vectors: torch.Tensor | None = None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(tau, epsilon) of the loop: numbers, or one value per LUT group for `tau_scale="variance"`."""
        s = self.settings
        if s.tau_scale == "absolute":
            return s.tau, s.epsilon
        v = self.vectors() if vectors is None else vectors.detach()
        var = (v - v.mean(1, keepdim=True)).square().sum(-1).mean(1).clamp_min(_VAR_FLOOR)  # (G,)
        return s.tau * var, s.epsilon * var.sqrt()

    def soft_weight(self, update: bool = True) -> torch.Tensor:
        """W~ = A C from the current centroids; with `update` (and gradients recorded) C_T becomes the next start."""
        weight = self.weight
        record = torch.is_grad_enabled() and weight.requires_grad
        if record and self._soft is not None and self._soft[0] == self._soft_key():
            return self._soft[1]
        s = self.settings
        # Saved for backward as they are, also under activation checkpointing: a recomputed forward reuses this
        # tensor instead of running the loop again (the loop saves only the weight and a tiny centroid history).
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            vectors = self.vectors(weight)
            tau, epsilon = self.temperature(vectors)
            soft, centroids = dkm_cluster(
                vectors,
                self.centroids,
                tau,
                s.max_iters,
                epsilon,
                self.implementation,
                bucket_dtype=bucket_dtype_for(weight),  # of the weight's own dtype, before the float32 copy
            )
            scale = self.weight_scale if self.layout.per_channel_scale else None
            out = self.layout.weight_from_vectors(soft, scale).to(weight.dtype)
        if record:
            if update:
                with torch.no_grad():
                    self.centroids.copy_(centroids)
                self._hard = None
            self._soft = (self._soft_key(), out)
            out.register_hook(self._release_soft)
        return out

    def _release_soft(self, grad: torch.Tensor) -> None:
        self._soft = None

    @torch.no_grad()
    def assignments(self) -> torch.Tensor:
        """Nearest-centroid index of every vector, (groups, n)."""
        return hard_assign(self.vectors(), self.centroids)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        if self.tied_source is not None:
            return self.tied_source.hard_weight().view(self.weight.shape)
        if not self.dkm_ready:
            self.init_centroids()
        key = (self.weight._version, self.weight.data_ptr(), self.centroids._version, self.centroids.data_ptr())
        if self._hard is None or self._hard[0] != key:
            lut_dtype = self.settings.lut_torch_dtype
            snapped = gather_centroids(self.assignments(), self.centroids.to(lut_dtype).float())
            scale = self.weight_scale.to(lut_dtype).float() if self.layout.per_channel_scale else None
            hard = self.layout.weight_from_vectors(snapped, scale).to(self.weight.dtype).contiguous()
            self._hard = (key, hard)
        return self._hard[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self, x, self.clustered_weight())

    def extra_repr(self) -> str:
        lay, s = self.layout, self.settings
        tied = f", tied to {type(self.tied_source).__name__}" if self.tied_source is not None else ""
        tau = f"{s.tau:g}" + (" x var" if s.tau_scale == "variance" else "")
        return (
            f"{super().extra_repr()}, dkm(bits={lay.bits}, cluster_dim={lay.cluster_dim}, groups={lay.groups}, "
            f"tau={tau}, per_channel_scale={lay.per_channel_scale}{tied})"
        )


def dkm_modules(model: nn.Module) -> list[tuple[str, DKMMixin]]:
    """(name, module) for every DKM module in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DKMMixin)]
