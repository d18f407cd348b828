"""Training-time DKM modules: drop-in subclasses of Linear, Conv1d/2d/3d, transformers' Conv1D and Embedding.

A DKM module keeps its float `weight` parameter (the optimiser trains it as usual) and a `centroids` buffer
(G, 2**bits, cluster_dim) carried from step to step. In `train()` the forward uses the soft-clustered weight
W~ = A C (differentiable); in `eval()` the hard-assigned weight (each vector snapped to its nearest centroid),
computed once and cached until the weight or the centroids change. `freeze()` returns the palettized inference
module (LUT + packed indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .clustering import bucket_dtype_for, dkm_cluster, gather_centroids, hard_assign, kmeans_init
from .config import LayerSpec

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.Embedding)
# Below this many weights the exact chunked path is as fast as the uniquified one (benchmarks/run.py --suite layer).
UNIQUIFY_MIN_WEIGHTS = 1 << 13
LUT_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SCALE_FLOOR = 1e-12


@dataclass(frozen=True)
class Geometry:
    """How a weight tensor is seen by the clustering: (channels, features) rows, then (G, n, d) vectors.

    Channels are output channels (rows of a Linear, filters of a Conv, columns of transformers' Conv1D, tokens of an
    Embedding); vectors of `cluster_dim` values run along the features of one channel; LUT group g holds channels
    [g * C/G, (g + 1) * C/G).
    """

    shape: tuple[int, ...]
    transposed: bool
    groups: int
    cluster_dim: int

    @property
    def channels(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def features(self) -> int:
        return int(torch.Size(self.shape).numel()) // self.channels

    @property
    def vectors_per_group(self) -> int:
        return self.channels * self.features // (self.groups * self.cluster_dim)

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight.reshape(self.channels, self.features)

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t() if self.transposed else rows.reshape(self.shape)

    def to_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.groups, -1, self.cluster_dim)

    def from_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.reshape(self.channels, self.features)


def geometry_for(module: nn.Module, spec: LayerSpec, name: str = "") -> Geometry:
    """The Geometry of `module` under `spec`; a ValueError names the module and the value that does not fit."""
    shape = tuple(module.weight.shape)
    geometry = Geometry(shape, isinstance(module, Conv1D), 1, spec.cluster_dim)
    if geometry.features % spec.cluster_dim:
        raise ValueError(
            f"cluster_dim={spec.cluster_dim} does not divide the {geometry.features} features per channel of "
            f"{name or type(module).__name__} (weight shape {shape})"
        )
    if spec.granularity == "per_grouped_channel":
        if geometry.channels % spec.group_size:
            raise ValueError(
                f"group_size={spec.group_size} does not divide the {geometry.channels} output channels of "
                f"{name or type(module).__name__} (weight shape {shape})"
            )
        geometry = Geometry(shape, geometry.transposed, geometry.channels // spec.group_size, spec.cluster_dim)
    return geometry


def functional_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`module`'s own forward computation, with `weight` in place of its weight parameter."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, module.bias)
    if isinstance(module, Conv1D):
        out = torch.addmm(module.bias, x.reshape(-1, x.size(-1)), weight)
        return out.view(*x.shape[:-1], module.nf)
    if isinstance(module, nn.Embedding):
        return F.embedding(
            x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
    raise TypeError(f"dkm_hf does not support {type(module).__name__}")


def _clone_as(cls: type, module: nn.Module) -> nn.Module:
    """A new `cls` instance sharing `module`'s parameters, buffers, submodules and attributes (no copy of data)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


# Attributes and buffers a DKM module adds to the module it replaces.
DKM_ATTRS = ("spec", "geometry", "dkm_seed", "dkm_enabled", "dkm_ready", "soft_eval", "tied_source", "_start", "_hard")
DKM_BUFFERS = ("centroids", "weight_scale")


class DKMMixin:
    """The DKM state and logic shared by every clustered module type."""

    spec: LayerSpec
    geometry: Geometry
    centroids: torch.Tensor

    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec, name: str = "", seed: int = 0) -> DKMMixin:
        geometry = geometry_for(module, spec, name)
        new = _clone_as(cls, module)
        new.spec, new.geometry, new.dkm_seed = spec, geometry, seed
        # DKM state is float32 whatever the weight dtype: centroid updates are sums over many weights.
        device = module.weight.device
        new.register_buffer(
            "centroids",
            torch.zeros(geometry.groups, spec.n_clusters, spec.cluster_dim, device=device, dtype=torch.float32),
        )
        if spec.per_channel_scale:
            new.register_buffer("weight_scale", torch.ones(geometry.channels, 1, device=device, dtype=torch.float32))
        new.dkm_enabled = True
        new.dkm_ready = False
        new.soft_eval = False
        new.tied_source = None
        new._start = None  # centroids the last forward started from (reused when backward recomputes it)
        new._hard = None  # (cache key, hard weight)
        return new

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def implementation(self) -> str:
        if self.spec.implementation != "auto":
            return self.spec.implementation
        big = self.weight.numel() >= UNIQUIFY_MIN_WEIGHTS
        return "uniquified" if self.spec.cluster_dim == 1 and big else "chunked"

    def _scaled_rows(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self.geometry.to_rows(weight)
        return rows / self.weight_scale if self.spec.per_channel_scale else rows

    def _unscaled_weight(self, vectors: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.geometry.from_vectors(vectors)
        if self.spec.per_channel_scale:
            rows = rows * (self.weight_scale if scale is None else scale)
        return self.geometry.from_rows(rows)

    @torch.no_grad()
    def init_centroids(self, seed: int | None = None) -> None:
        """(Re)initialise the centroids from the current weight with k-means++ and Lloyd."""
        if self.tied_source is not None:
            return
        weight = self.weight.detach()
        if self.spec.per_channel_scale:
            scale = self.geometry.to_rows(weight.float()).abs().amax(1, keepdim=True).clamp_min(_SCALE_FLOOR)
            self.weight_scale.copy_(scale)
        vectors = self.geometry.to_vectors(self._scaled_rows(weight.float()))
        seed = self.dkm_seed if seed is None else seed
        self.centroids.copy_(kmeans_init(vectors, self.spec.n_clusters, seed=seed).to(self.centroids))
        self.dkm_ready = True
        self._start = self._hard = None

    def train(self, mode: bool = True):
        # Fused optimisers update weights without bumping their version counter: a mode switch (the boundary
        # between training and evaluation) always drops the cached hard weight.
        self._hard = None
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "centroids" in state_dict:
            self.dkm_ready = True
            self._start = self._hard = None

    # -- weights -----------------------------------------------------------------------------------------------------
    def clustered_weight(self) -> torch.Tensor:
        """The weight the forward uses: soft-clustered in train(), hard-assigned in eval(), dense if disabled."""
        if self.tied_source is not None:
            return self.tied_source.clustered_weight().reshape(self.weight.shape)
        if not self.dkm_enabled:
            return self.weight
        if not self.dkm_ready:
            self.init_centroids()
        if self.training:
            return self.soft_weight()
        return self.soft_weight(update=False) if self.soft_eval else self.hard_weight()

    def soft_weight(self, update: bool = True) -> torch.Tensor:
        """W~ = A C, starting from the current centroids. With `update`, C_T becomes the next start.

        A forward recomputed during backward (activation checkpointing) starts from the same centroids as the
        original forward did, so it reproduces it exactly.
        """
        recomputing = torch._C._current_graph_task_id() != -1
        if recomputing and self._start is not None:
            start, update = self._start, False
        else:
            start = self.centroids.detach().clone()
            if update:
                self._start = start
        weight = self.weight
        vectors = self.geometry.to_vectors(self._scaled_rows(weight.float()))
        soft, centroids = dkm_cluster(
            vectors,
            start,
            self.spec.tau,
            self.spec.max_iters,
            self.spec.epsilon,
            self.implementation,
            bucket_dtype=bucket_dtype_for(weight),  # of the weight's own dtype, before the float32 copy
        )
        if update:
            with torch.no_grad():
                self.centroids.copy_(centroids)
            self._hard = None
        return self._unscaled_weight(soft).to(weight.dtype)

    @torch.no_grad()
    def assignments(self) -> torch.Tensor:
        """Nearest-centroid index of every vector, (G, n)."""
        return hard_assign(self.geometry.to_vectors(self._scaled_rows(self.weight.detach().float())), self.centroids)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        if self.tied_source is not None:
            return self.tied_source.hard_weight().reshape(self.weight.shape)
        key = (self.weight._version, self.weight.data_ptr(), self.centroids._version, self.centroids.data_ptr())
        if self._hard is None or self._hard[0] != key:
            # Rounded to the LUT dtype: evaluation sees exactly the weights the palettized checkpoint will hold.
            lut_dtype = LUT_TORCH_DTYPES[self.spec.lut_dtype]
            snapped = gather_centroids(self.assignments(), self.centroids.to(lut_dtype).float())
            scale = self.weight_scale.to(lut_dtype).float() if self.spec.per_channel_scale else None
            self._hard = (key, self._unscaled_weight(snapped, scale).to(self.weight.dtype).contiguous())
        return self._hard[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self, x, self.clustered_weight())

    def to_plain(self) -> nn.Module:
        """The original module type holding the hard-clustered weight (or the dense one if clustering is off)."""
        return plain_module(self, self.hard_weight() if self.dkm_enabled else self.weight)

    def freeze(self, lut_dtype: torch.dtype | None = None) -> nn.Module:
        """The palettized inference module of this layer (LUT + packed indices); this module is left unchanged."""
        from .palettized import palettize

        return palettize(self, lut_dtype or LUT_TORCH_DTYPES[self.spec.lut_dtype])

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"{super().extra_repr()}, dkm(bits={s.bits}, cluster_dim={s.cluster_dim}, groups={self.geometry.groups}"
            f", tau={s.tau:g}, per_channel_scale={s.per_channel_scale})"
        )


class DKMLinear(DKMMixin, nn.Linear):
    pass


class DKMConv1d(DKMMixin, nn.Conv1d):
    pass


class DKMConv2d(DKMMixin, nn.Conv2d):
    pass


class DKMConv3d(DKMMixin, nn.Conv3d):
    pass


class DKMConv1D(DKMMixin, Conv1D):
    pass


class DKMEmbedding(DKMMixin, nn.Embedding):
    pass


# Most specific first: the first isinstance match wins, so subclasses of these types are clustered too.
DKM_CLASSES: dict[type, type] = {
    nn.Conv1d: DKMConv1d,
    nn.Conv2d: DKMConv2d,
    nn.Conv3d: DKMConv3d,
    Conv1D: DKMConv1D,
    nn.Embedding: DKMEmbedding,
    nn.Linear: DKMLinear,
}


# Everything dkm_hf adds to a module, in either of its forms (DKM or palettized).
_ADDED_BUFFERS = DKM_BUFFERS + ("weight_lut", "weight_indices", "_dense_weight")
_ADDED_ATTRS = DKM_ATTRS + ("bits", "inference_mode", "compute_dtype")


def plain_module(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A module of the original torch type with `weight` as its parameter and no dkm_hf state."""
    base = next(b for b in DKM_CLASSES if isinstance(module, b))
    plain = _clone_as(base, module)
    for key in _ADDED_BUFFERS:
        plain._buffers.pop(key, None)
    for key in _ADDED_ATTRS:
        plain.__dict__.pop(key, None)
    plain.weight = nn.Parameter(weight.detach().clone())
    return plain


def dkm_class_for(module: nn.Module) -> type | None:
    for base, cls in DKM_CLASSES.items():
        if isinstance(module, base):
            return cls
    return None


def dkm_modules(model: nn.Module):
    """(name, module) for every DKM module in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DKMMixin)]
