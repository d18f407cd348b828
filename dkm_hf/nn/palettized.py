"""Inference-time palettized modules: a lookup table plus packed b-bit indices in place of the weight.

For a clustered module `m` the state dict holds (see `Layout`)

    m.weight_lut      (groups, 2**bits, cluster_dim)   float16 by default
    m.weight_indices  uint8, the (groups, n) nearest-centroid indices packed by `ops.packing.pack_indices`
    m.weight_scale    (channels, 1)                    only with per-channel scales

and the weight is W = from_rows(lut[g, idx] * scale). Two inference modes:

    "dense"   decode once, on the first forward, and keep the decoded weight: the forward costs the original's;
    "packed"  keep only LUT + indices in memory and decode in every forward: the smallest memory.

LUTs and scales keep their stored dtype through `model.to(dtype)`, `.half()`, `.bfloat16()`: the cast sets the
dtype the weight is decoded to (`compute_dtype`), so a cast model saves the same checkpoint it loaded from.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.packing import unpack_range
from .layout import Layout
from .registry import apply_keeping_dtype, functional_forward, module_type, set_tie, swap_class, variant_class

MODES = ("dense", "packed")
DECODE_SLICE = 1 << 18  # vectors decoded at a time (a multiple of 8)
BUFFERS = ("weight_lut", "weight_indices", "weight_scale")
_KEPT_DTYPE = ("weight_lut", "weight_scale")
_ATTRS = ("layout", "inference_mode", "compute_dtype", "tied_source", "_dense")


class PalettizedMixin:
    """Shared state of palettized modules; `isinstance(m, nn.Linear)` etc. still holds."""

    prefix = "Palettized"
    layout: Layout
    inference_mode: str
    compute_dtype: torch.dtype
    tied_source: PalettizedMixin | None

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        layout: Layout,
        lut_dtype: torch.dtype = torch.float16,
        tied_source: PalettizedMixin | None = None,
    ) -> PalettizedMixin:
        """The palettized variant of `module` (a plain module of a registered type), with uninitialised buffers of the
        right shapes on the weight's device, to be filled by a state dict or `fill`; `module.weight` is dropped."""
        weight = module.weight
        new = swap_class(module, variant_class(cls, module_type(module).base))
        new._parameters.pop("weight", None)
        new.layout, new.inference_mode, new.compute_dtype, new._dense = layout, "dense", weight.dtype, None
        set_tie(new, tied_source)
        if tied_source is None:
            options = {"device": weight.device}
            new.register_buffer("weight_lut", torch.empty(layout.lut_shape, dtype=lut_dtype, **options))
            new.register_buffer("weight_indices", torch.empty(layout.packed_bytes, dtype=torch.uint8, **options))
            if layout.per_channel_scale:
                new.register_buffer("weight_scale", torch.empty(layout.scale_shape, dtype=lut_dtype, **options))
        return new

    def unwrap(self) -> nn.Module:
        """The plain module of the registered type without any palettized state (and without a weight)."""
        return swap_class(self, module_type(self).base, BUFFERS, _ATTRS)

    @torch.no_grad()
    def fill(self, lut: torch.Tensor, packed_indices: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        self.weight_lut.copy_(lut)
        self.weight_indices.copy_(packed_indices)
        if scale is not None:
            self.weight_scale.copy_(scale)
        self._dense = None

    def _apply(self, fn, recurse=True):
        apply = lambda f: super(PalettizedMixin, self)._apply(f, recurse)  # noqa: E731
        self.compute_dtype = apply_keeping_dtype(self, fn, _KEPT_DTYPE, apply, self.compute_dtype).dtype
        self._dense = None
        return self

    @property
    def has_scale(self) -> bool:
        return "weight_scale" in self._buffers

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """The dense weight, in `compute_dtype`, decoded in slices so temporaries stay small."""
        if self.tied_source is not None:
            return self.tied_source.weight.view(self.layout.shape)
        lay = self.layout
        k, n, per_group = lay.n_clusters, lay.vectors, lay.vectors_per_group
        lut = self.weight_lut.float().reshape(-1, lay.cluster_dim)  # (groups * k, d)
        vectors = torch.empty(n, lay.cluster_dim, dtype=torch.float32, device=lut.device)
        for start in range(0, n, DECODE_SLICE):
            stop = min(n, start + DECODE_SLICE)
            idx = unpack_range(self.weight_indices, lay.bits, start, stop)
            if lay.groups > 1:
                idx += torch.arange(start, stop, device=idx.device).div_(per_group, rounding_mode="floor") * k
            torch.index_select(lut, 0, idx, out=vectors[start:stop])
        scale = self.weight_scale.float() if self.has_scale else None
        return lay.weight_from_vectors(vectors, scale).to(self.compute_dtype).contiguous()

    def _state_key(self) -> tuple:
        """Changes whenever a buffer is replaced or written (loading a checkpoint does either)."""
        source = self.tied_source if self.tied_source is not None else self
        return tuple((t.data_ptr(), t._version) for t in source._buffers.values() if t is not None)

    @property
    def weight(self) -> torch.Tensor:
        if self.inference_mode == "packed":
            return self.decode()
        key = self._state_key()
        if self._dense is None or self._dense[0] != (key, self._dense[1]._version):  # also if written in place
            weight = self.decode()
            self._dense = ((key, weight._version), weight)
        return self._dense[1]

    def set_inference_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"inference mode must be one of {list(MODES)}, got {mode!r}")
        self.inference_mode, self._dense = mode, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self, x, self.weight)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"shape={lay.shape}, palettized(bits={lay.bits}, cluster_dim={lay.cluster_dim}, groups={lay.groups}, "
            f"mode={self.inference_mode}{', tied' if self.tied_source is not None else ''})"
        )


def palettized_modules(model: nn.Module) -> list[tuple[str, PalettizedMixin]]:
    """(name, module) for every palettized module in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PalettizedMixin)]
