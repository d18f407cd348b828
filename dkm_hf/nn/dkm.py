"""Training-time DKM: a clustered weight (`DKMWeight`) and the module that holds it (`DKMMixin`).

A clustered weight keeps its float parameter (the optimiser trains it, every state-dict key is unchanged) and gets a
float32 centroid buffer (groups, 2**bits, cluster_dim) carried from step to step. The module keeps its own class and
forward (`weights.variant_class`); only while its forward runs does each clustered parameter read as the soft weight
W~ = A C in `train()` (differentiable) or the hard weight in `eval()` (snapped to the nearest centroids in the LUT
dtype: what the palettized checkpoint holds), an instance attribute shadowing the parameter for that call. Outside
it is the plain parameter (initialisation, ties, optimisers, FSDP2, state dicts).

One soft weight per step: computed once and reused until its gradient has been computed (or the weight, the centroids
or tau change), so a weight used twice in one forward (tied embeddings, a shared layer, activation checkpointing's
recomputation) costs one DKM pass. The centroids advance only in forwards that record gradients; a `no_grad` forward
in train mode reads them without moving them (and uses a soft weight that awaits its gradient: a reentrant
checkpoint's no_grad forward sees what its recomputation will)."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..ops.attention import hard_assign, snap
from ..ops.buckets import bucket_dtype_for
from ..ops.dkm import choose_implementation, dkm_cluster
from ..ops.kmeans import kmeans_init
from .layout import ClusterSettings, Layout, group_variance
from .weights import (
    HardWeightGradient,
    _pack,
    _rebuild,
    _unpack,
    apply_keeping_dtype,
    base_class,
    buffer_name,
    describe_weights,
    is_whole,
    module_lock,
    only_weight,
    refuse_tracing,
    set_tie,
    swap_class,
    variant_class,
    version,
    weight_name,
)

STATE_KINDS = ("centroids", "scale")  # float32 buffers, whatever the weight's dtype
# tau's variance floor, of the mean squared centroid (a spread of 0.1% of the weights' size): 2 / tau of a constant
# group (variance 0) turned float rounding into gradients of 1e11. Below tau's own floor the softmax is an argmin
# anyway, and 1 / tau overflows float32 (0 * inf: NaN gradients).
_VAR_FLOOR, _VAR_RELATIVE_FLOOR, _TAU_FLOOR = 1e-24, 1e-6, 1e-30


class DKMWeight:
    """The DKM state of one clustered parameter `param` of `module`: its layout, loop settings and centroids."""

    def __init__(
        self,
        module: nn.Module,
        param: str,
        layout: Layout,
        settings: ClusterSettings,
        seed: int = 0,
        tied_source: DKMWeight | None = None,
    ):
        self.module, self.param = module, param
        self.layout, self.settings, self.dkm_seed = layout, settings, seed
        self.dkm_enabled, self.dkm_ready, self.soft_eval = True, tied_source is not None, False
        self._soft = self._hard = None  # (cache key, weight, its version: a forward may write into it, max_norm)
        self.importance = None  # (G, n) sample weights of an importance-weighted loop (surgery.importance)
        set_tie(self, tied_source)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_soft": None, "_hard": None}  # cached weights belong to one autograd graph

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The float parameter (never the clustered weight a running forward reads)."""
        return self.module._parameters[self.param]

    @property
    def centroids(self) -> torch.Tensor:  # a tied weight's are its source's
        owner = self if self.tied_source is None else self.tied_source
        return owner.module._buffers[buffer_name(owner.param, "centroids")]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.module._buffers[buffer_name(self.param, "scale")]

    @property
    def has_state(self) -> bool:
        return buffer_name(self.param, "centroids") in self.module._buffers

    def state_names(self) -> tuple[str, ...]:  # the module's buffers of this weight's DKM state
        return tuple(buffer_name(self.param, kind) for kind in STATE_KINDS)

    @torch.inference_mode(False)  # normal tensors even when prepared under inference_mode: training writes them
    def register_state(self) -> None:
        options, register = {"device": self.weight.device, "dtype": torch.float32}, self.module.register_buffer
        register(buffer_name(self.param, "centroids"), torch.zeros(self.layout.lut_shape, **options))
        if self.layout.per_channel_scale:
            register(buffer_name(self.param, "scale"), torch.ones(self.layout.scale_shape, **options))

    def drop_state(self) -> None:
        """Forget the centroids (and scales): the next `init_centroids` makes them from the weight."""
        for name in self.state_names():
            self.module._buffers.pop(name, None)
        self.dkm_ready = self.tied_source is not None
        self.forget()

    def forget(self) -> None:  # drop the cached soft and hard weights
        self._soft = self._hard = None

    @property
    def implementation(self) -> str:
        return self.settings.implementation  # "auto" is resolved per call by ops.dkm.choose_implementation

    def vectors(self, weight=None, float32: bool = True, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The clustered (groups, n, d) vectors of the parameter (detached) or `weight`, over the per-channel scales if
        any (the weight's, or `scale`); float32, or with `float32=False` the weight's dtype where that is a view."""
        weight = self.weight.detach() if weight is None else weight
        rows = self.layout.to_rows(weight.float() if float32 else weight)
        if self.layout.per_channel_scale:
            rows = rows / (self.weight_scale if scale is None else scale)
        return self.layout.to_vectors(rows)

    @torch.no_grad()
    def init_scale(self) -> None:
        """Per-channel scales (if the layout has them) from the current weight; registers the state if missing."""
        if not self.has_state:
            self.register_state()
        if self.layout.per_channel_scale:
            self.weight_scale.copy_(self.layout.initial_scale(self.weight))

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids.copy_(centroids.to(self.centroids.device))
        self.dkm_ready = True
        self.forget()

    @torch.no_grad()
    def init_centroids(self, seed: int | None = None) -> None:
        """(Re)initialise the centroids (and per-channel scales) from the current weight: k-means++ then Lloyd (with an
        importance per value: `surgery.importance.init_centroids`)."""
        if self.tied_source is None:
            seed, k = self.dkm_seed if seed is None else seed, self.layout.n_clusters
            self.set_centroids(kmeans_init(self.init_vectors(), k, seed=seed, restarts=self.settings.kmeans_restarts))

    def importance_vectors(self, f: torch.Tensor) -> torch.Tensor:
        """A tensor of the weight's shape (e.g. its importance) laid out as the (groups, n, d) vectors, unscaled."""
        if tuple(f.shape) != tuple(self.weight.shape):
            raise ValueError(f"importance of shape {tuple(f.shape)} for a weight of shape {tuple(self.weight.shape)}")
        return self.layout.to_vectors(self.layout.to_rows(f.detach().float().to(self.weight.device)))

    @torch.no_grad()
    def init_vectors(self) -> torch.Tensor:
        """`init_centroids` up to the k-means (batched over weights): the state, scales, and the vectors to cluster (a
        16-bit weight's own, which k-means reads in float32 a batch of rows at a time)."""
        self.init_scale()
        return self.vectors(float32=False)

    # -- weights (run eagerly: under dynamo the caches' checks ran at other times, and weights clustered twice) -------
    @torch.compiler.disable
    def clustered_weight(self) -> torch.Tensor:
        """The weight the forward uses: soft-clustered in train(), hard-assigned in eval(), dense if disabled."""
        if self.tied_source is not None:
            return self.tied_source.clustered_weight().view(self.weight.shape)
        if not self.dkm_enabled:
            return self.weight
        if not self.dkm_ready:
            self.init_centroids()
        if self.module.training:
            return self.soft_weight()
        if self.soft_eval:
            return self.soft_weight(update=False)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return HardWeightGradient.apply(self.hard_weight(), self.weight)  # warns in a backward through it
        return self.hard_weight()

    def _soft_key(self) -> tuple:
        w, c, s = self.weight, self.centroids, self.settings
        return (version(w), w.data_ptr(), version(c), c.data_ptr(), s.tau, s.tau_scale, s.epsilon, s.max_iters)

    def temperature(self, vectors: torch.Tensor | None = None, groups: slice | None = None) -> tuple:
        """(tau, epsilon) of the loop: numbers, or one value per LUT group (of `groups` only, where given) for
        `tau_scale="variance"`; `vectors` are all groups' (`vectors()`), floored by the centroids' size."""
        s = self.settings
        if s.tau_scale == "absolute":
            return max(s.tau, _TAU_FLOOR), s.epsilon
        v, c = self.vectors() if vectors is None else vectors.detach().float(), self.centroids
        v, c = (v, c) if groups is None else (v[groups], c[groups])
        floor = c.square().mean(dim=(1, 2)).mul_(_VAR_RELATIVE_FLOOR).clamp_min_(_VAR_FLOOR)
        var = torch.maximum(group_variance(v), floor)  # (G,)
        return (s.tau * var).clamp_min_(_TAU_FLOOR), s.epsilon * var.sqrt()

    def soft_weight(self, update: bool = True) -> torch.Tensor:
        """W~ = A C from the current centroids; with `update` (and gradients recorded) C_T becomes the next start."""
        weight = self.weight
        record = torch.is_grad_enabled() and weight.requires_grad
        if _fresh(self._soft, self._soft_key()):  # awaiting its gradient: the step's weight
            return self._soft[1]
        s = self.settings
        # Saved for backward as they are, also under activation checkpointing: a recomputed forward reuses this
        # tensor instead of running the loop again (the loop saves only the weight and a tiny centroid history).
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            # the fused kernels take a 16-bit weight as it is (and save it, not a float32 copy, for backward)
            vectors = self.vectors(weight, float32=False)
            implementation = choose_implementation(self.implementation, vectors, weighted=self.importance is not None)
            # the 16-bit type whose patterns are the vectors' values: a 16-bit weight's own, unless divided by a scale
            buckets = bucket_dtype_for(vectors)
            vectors = vectors if implementation == "fused" else vectors.float()
            tau, epsilon = self.temperature(vectors)
            soft, centroids = dkm_cluster(
                vectors, self.centroids, tau, s.max_iters, epsilon, implementation, bucket_dtype=buckets,
                importance=self.importance,
            )  # fmt: skip
            scale = self.weight_scale if self.layout.per_channel_scale else None
            out = self.layout.weight_from_vectors(soft, scale).to(weight.dtype)
        if record:
            if update:
                with torch.no_grad():
                    self.centroids.copy_(centroids)
                self._hard = None
            self._soft = (self._soft_key(), out, version(out))
            # holding this state weakly: a bound method made a cycle through the graph (out -> its node's hooks ->
            # self -> _soft -> out) that gc cannot see, leaking a dropped model whose last forward had no backward
            ref = weakref.ref(self)
            out.register_hook(lambda grad: (state := ref()) is not None and setattr(state, "_soft", None))
        return out

    @torch.no_grad()
    def assignments(self) -> torch.Tensor:  # the nearest centroid's index of every vector, (groups, n)
        return hard_assign(self.vectors(), self.centroids)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        if self.tied_source is not None:
            return self.tied_source.hard_weight().view(self.weight.shape)
        if not self.dkm_ready:
            self.init_centroids()
        key = (version(self.weight), self.weight.data_ptr(), version(self.centroids), self.centroids.data_ptr())
        if not _fresh(self._hard, key):
            with torch.inference_mode(False):  # a normal tensor even under inference_mode: it is kept (and versioned)
                hard = self.snapped(self.vectors(float32=False), self.centroids).contiguous()
            self._hard = (key, hard, version(hard))
        return self._hard[1]

    @torch.no_grad()
    def snapped(self, vectors: torch.Tensor, centroids: torch.Tensor, scale=None) -> torch.Tensor:
        """The hard weight of `vectors` (`vectors(scale=scale)`) and `centroids`, as a palettized checkpoint holds it:
        the LUT and, with per-channel scales, the weight's (or `scale`) in the LUT dtype."""
        lut = centroids.to(self.settings.lut_torch_dtype)
        if not self.layout.per_channel_scale:  # the LUT values in the weight dtype, as a float32 detour rounds them
            return self.layout.weight_from_vectors(snap(vectors, centroids, lut.to(self.weight.dtype)), None)
        scale = (self.weight_scale if scale is None else scale).to(lut.dtype).float()
        return self.layout.weight_from_vectors(snap(vectors, centroids, lut.float()), scale).to(self.weight.dtype)

    def describe(self) -> str:
        lay, s, tied = self.layout, self.settings, ", tied" if self.tied_source is not None else ""
        tau = f"{s.tau:g}" + (" x var" if s.tau_scale == "variance" else "")
        return (
            f"{self.param}: dkm(bits={lay.bits}, cluster_dim={lay.cluster_dim}, groups={lay.groups}, tau={tau}, "
            f"per_channel_scale={lay.per_channel_scale}{tied})"
        )


class DKMMixin:
    """The class mixed into a module holding DKM-clustered weights (`module.dkm_weights`: parameter -> DKMWeight).

    `isinstance(m, DKMMixin)` finds them; `type(m)` is a subclass of the module's own class. For a module with one
    clustered weight the per-weight API (`m.layout`, `m.settings`, `m.hard_weight()`, ...) reads that weight's."""

    prefix = "DKM"
    dkm_weights: dict[str, DKMWeight]

    @classmethod
    def class_attributes(cls, params: tuple[str, ...]) -> dict:
        return {}

    @classmethod
    def attach(cls, module: nn.Module, weights: dict[str, DKMWeight]) -> nn.Module:
        """Make `module` (in place) hold the DKM weights `weights` in addition to any it holds already."""
        current = dict(getattr(module, "dkm_weights", {}))
        current.update(weights)
        swap_class(module, variant_class(cls, base_class(module), tuple(sorted(current))))
        module.dkm_weights = current
        return module

    def detach_dkm(self) -> nn.Module:
        """The module back in its own class, its parameters kept, every DKM buffer and attribute dropped."""
        for state in self.dkm_weights.values():
            for name in state.state_names():
                self._buffers.pop(name, None)
        del self.dkm_weights
        swap_class(self, base_class(self))
        return self

    def __reduce_ex__(self, protocol):  # not the clustered weights a copy taken inside a forward finds shadowing
        state = {k: v for k, v in self.__getstate__().items() if k not in self.dkm_weights}
        return (_rebuild, (__name__, "DKMMixin", base_class(self), type(self)._dkm_params), state)

    def _state_names(self) -> tuple[str, ...]:
        return tuple(name for w in self.dkm_weights.values() for name in w.state_names())

    def _forget(self) -> None:
        for state in self.dkm_weights.values():
            state.forget()

    def _apply(self, fn, recurse=True):
        apply_keeping_dtype(self, fn, self._state_names(), lambda f: super(DKMMixin, self)._apply(f, recurse))
        for state in self.dkm_weights.values():  # `set_importance`'s sample weights follow the weight's device
            if state.importance is not None:
                state.importance = state.importance.to(state.weight.device)
        self._forget()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for state in self.dkm_weights.values():
            if prefix + buffer_name(state.param, "centroids") in state_dict:
                state.dkm_ready = True
                state.forget()

    def train(self, mode: bool = True):
        # Fused optimisers update weights without bumping their version counter: a mode switch (the boundary
        # between training and evaluation) always drops the cached weights.
        self._forget()
        return super().train(mode)

    @contextlib.contextmanager
    def clustered_parameters(self):
        """Within the context, each clustered parameter reads as its clustered weight (an instance attribute that
        shadows the parameter; the parameter itself is untouched). Contexts nest (a parent's scope around the
        module's own forward): leaving one restores what the enclosing one set. Threads take turns (`module_lock`)."""
        refuse_tracing(self, jit=True)  # a parent's scope opens this before the module's forward
        with module_lock(self):
            active = [(p, w) for p, w in self.dkm_weights.items() if w.dkm_enabled and is_whole(w.weight)]
            shadow = {p: w.clustered_weight() for p, w in active}
            previous = {p: self.__dict__[p] for p in shadow if p in self.__dict__}
            self.__dict__.update(shadow)
            try:
                yield
            finally:
                for p in shadow:
                    self.__dict__.pop(p, None)
                self.__dict__.update(previous)

    def forward(self, *args, **kwargs):
        with self.clustered_parameters():
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return describe_weights(super().extra_repr(), self.dkm_weights)

    # -- the per-weight API of a module with one clustered weight ----------------------------------------------------
    def _only(self) -> DKMWeight:
        return only_weight(self, self.dkm_weights, "dkm_weights")

    layout = property(lambda self: self._only().layout)
    settings = property(lambda self: self._only().settings)
    # the module whose weight this one shares (its weight's `tied_source` is that weight)
    tied_source = property(lambda self: getattr(self._only().tied_source, "module", None))
    implementation = property(lambda self: self._only().implementation)
    dkm_ready = property(lambda self: self._only().dkm_ready)
    dkm_enabled = property(
        lambda self: self._only().dkm_enabled, lambda self, v: setattr(self._only(), "dkm_enabled", v)
    )
    soft_eval = property(lambda self: self._only().soft_eval, lambda self, v: setattr(self._only(), "soft_eval", v))

    def hard_weight(self) -> torch.Tensor:
        return self._only().hard_weight()

    def soft_weight(self, update: bool = True) -> torch.Tensor:
        return self._only().soft_weight(update)

    def clustered_weight(self) -> torch.Tensor:
        return self._only().clustered_weight()

    def init_centroids(self, seed: int | None = None) -> None:
        self._only().init_centroids(seed)

    def assignments(self) -> torch.Tensor:
        return self._only().assignments()


def _fresh(cache: tuple | None, key: tuple) -> bool:
    return cache is not None and cache[0] == key and version(cache[1]) == cache[2]


def dkm_modules(model: nn.Module) -> list[tuple[str, DKMWeight]]:
    """(name, state) of every DKM-clustered weight of `model`, in model order (names as `weights.weight_name`)."""
    return [
        (weight_name(module_name, param), state)
        for module_name, module in model.named_modules()
        if isinstance(module, DKMMixin)
        for param, state in module.dkm_weights.items()
    ]
