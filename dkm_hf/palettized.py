"""Inference modules of a finalised DKM model: a lookup table plus packed b-bit indices per weight.

For a clustered module `m` the state dict holds
    m.weight_lut      (G, 2**bits, cluster_dim)  float16 by default
    m.weight_indices  uint8, the (G, n) nearest-centroid indices packed by `packing.pack_indices`
    m.weight_scale    (channels, 1)              only with per-channel scales
and the weight is W = from_rows(lut[g, idx] * scale). Two inference modes:
    "dense"   decode once into a non-persistent buffer: the forward costs what the original layer's does;
    "packed"  keep only LUT + indices in memory and decode in every forward: the smallest RAM.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import DKM_ATTRS, DKM_BUFFERS, DKMMixin, Geometry, _clone_as, functional_forward, plain_module
from .packing import pack_indices, packed_size, unpack_range

MODES = ("dense", "packed")
DECODE_SLICE = 1 << 18  # vectors decoded at a time (a multiple of 8)


class PalettizedMixin:
    """Shared state of palettized modules; the subclasses only pick the torch base class (isinstance still holds)."""

    bits: int
    geometry: Geometry
    tied_source: PalettizedMixin | None

    @classmethod
    def empty_like_module(
        cls,
        module: nn.Module,
        bits: int,
        geometry: Geometry,
        per_channel_scale: bool,
        lut_dtype: torch.dtype,
        tied: bool = False,
    ) -> PalettizedMixin:
        """A palettized module with uninitialised buffers of the right shapes, to be filled by a state dict."""
        new = _clone_as(cls, module)
        new._parameters.pop("weight", None)
        for attr in DKM_BUFFERS:
            new._buffers.pop(attr, None)
        for attr in DKM_ATTRS:
            new.__dict__.pop(attr, None)
        new.bits, new.geometry, new.tied_source = bits, geometry, None
        new.inference_mode, new.compute_dtype = "dense", module.weight.dtype
        device = module.weight.device
        if not tied:
            k, d = 2**bits, geometry.cluster_dim
            n = geometry.groups * geometry.vectors_per_group
            new.register_buffer("weight_lut", torch.empty(geometry.groups, k, d, dtype=lut_dtype, device=device))
            new.register_buffer("weight_indices", torch.empty(packed_size(n, bits), dtype=torch.uint8, device=device))
            if per_channel_scale:
                new.register_buffer("weight_scale", torch.empty(geometry.channels, 1, dtype=lut_dtype, device=device))
        new.register_buffer("_dense_weight", None, persistent=False)
        # Filled by the checkpoint, never by transformers' `_init_weights` (which would decode `weight` to init it).
        new._is_hf_initialized = True
        return new

    @property
    def has_scale(self) -> bool:
        return "weight_scale" in self._buffers

    def decode(self) -> torch.Tensor:
        """The dense weight, in `compute_dtype`, decoded in slices so temporaries stay small."""
        if self.tied_source is not None:
            return self.tied_source.weight.reshape(self.geometry.shape)
        g = self.geometry
        k, n, per_group = 2**self.bits, g.groups * g.vectors_per_group, g.vectors_per_group
        lut = self.weight_lut.float().reshape(-1, g.cluster_dim)  # (G * k, d)
        vectors = torch.empty(n, g.cluster_dim, dtype=torch.float32, device=lut.device)
        for start in range(0, n, DECODE_SLICE):
            stop = min(n, start + DECODE_SLICE)
            idx = unpack_range(self.weight_indices, self.bits, start, stop)
            if g.groups > 1:
                idx += torch.arange(start, stop, device=idx.device).div_(per_group, rounding_mode="floor") * k
            torch.index_select(lut, 0, idx, out=vectors[start:stop])
        rows = g.from_vectors(vectors)
        if self.has_scale:
            rows.mul_(self.weight_scale.float())
        return g.from_rows(rows).to(self.compute_dtype).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        if self._dense_weight is not None:
            return self._dense_weight
        return self.decode()

    def set_inference_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"inference mode must be one of {list(MODES)}, got {mode!r}")
        self.inference_mode = mode
        self._dense_weight = self.decode() if mode == "dense" and self.tied_source is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self, x, self.weight)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"shape={g.shape}, palettized(bits={self.bits}, cluster_dim={g.cluster_dim}, groups={g.groups}, "
            f"mode={self.inference_mode}{', tied' if self.tied_source is not None else ''})"
        )


class PalettizedLinear(PalettizedMixin, nn.Linear):
    pass


class PalettizedConv1d(PalettizedMixin, nn.Conv1d):
    pass


class PalettizedConv2d(PalettizedMixin, nn.Conv2d):
    pass


class PalettizedConv3d(PalettizedMixin, nn.Conv3d):
    pass


class PalettizedConv1D(PalettizedMixin, Conv1D):
    pass


class PalettizedEmbedding(PalettizedMixin, nn.Embedding):
    pass


PALETTIZED_CLASSES: dict[type, type] = {
    nn.Conv1d: PalettizedConv1d,
    nn.Conv2d: PalettizedConv2d,
    nn.Conv3d: PalettizedConv3d,
    Conv1D: PalettizedConv1D,
    nn.Embedding: PalettizedEmbedding,
    nn.Linear: PalettizedLinear,
}


def palettized_class_for(module: nn.Module) -> type:
    for base, cls in PALETTIZED_CLASSES.items():
        if isinstance(module, base):
            return cls
    raise TypeError(f"dkm_hf cannot palettize {type(module).__name__}")


@torch.no_grad()
def palettize(module: DKMMixin, lut_dtype: torch.dtype = torch.float16) -> PalettizedMixin:
    """Snap every vector of a DKM module to its nearest centroid and build the palettized module."""
    spec = module.spec
    cls = palettized_class_for(module)
    tied = module.tied_source is not None
    new = cls.empty_like_module(module, spec.bits, module.geometry, spec.per_channel_scale, lut_dtype, tied=tied)
    if not tied:
        if not module.dkm_ready:
            module.init_centroids()
        new.weight_lut = module.centroids.to(lut_dtype).clone()
        new.weight_indices = pack_indices(module.assignments(), spec.bits)
        if spec.per_channel_scale:
            new.weight_scale = module.weight_scale.to(lut_dtype).clone()
        new.set_inference_mode("dense")
    return new


def dense_module(module: PalettizedMixin) -> nn.Module:
    """A plain torch module (the original type) with the decoded weight as its parameter."""
    return plain_module(module, module.weight)


def palettized_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PalettizedMixin)]
