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

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.packing import unpack_bytes
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

    def _lut_rows(self, idx: torch.Tensor, first_group, per_group: int) -> torch.Tensor:
        """Turn indices (..., per_group) of consecutive groups starting at `first_group` (an int or a tensor of the
        first dimension's groups) into rows of the flattened (groups * k, d) LUT."""
        if self.layout.groups == 1:
            return idx
        groups = first_group + torch.arange(idx.shape[0], device=idx.device, dtype=idx.dtype)
        return idx.add_((groups * self.layout.n_clusters).unsqueeze(-1)) if per_group else idx

    def _decode_dtype(self) -> torch.dtype:
        """Gather in the compute dtype when that is exact (no scale to multiply), else in float32."""
        exact = not self.has_scale and self.compute_dtype in (torch.float32, torch.float16, torch.bfloat16)
        return self.compute_dtype if exact else torch.float32

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """The dense weight, in `compute_dtype`, decoded in slices so temporaries stay small."""
        if self.tied_source is not None:
            return self.tied_source.weight.view(self.layout.shape)
        lay = self.layout
        n, per_group, bits = lay.vectors, lay.vectors_per_group, lay.bits
        lut = self.weight_lut.to(self._decode_dtype()).reshape(-1, lay.cluster_dim)  # (groups * k, d)
        vectors = torch.empty(n, lay.cluster_dim, dtype=lut.dtype, device=lut.device)
        # slices of whole groups (and whole 8-index blocks) when groups are small, so offsets are one add per row
        unit = math.lcm(8, per_group) if per_group <= DECODE_SLICE else 8
        step = max(unit, DECODE_SLICE // unit * unit)
        for start in range(0, n, step):
            stop = min(n, start + step)
            packed = self.weight_indices[start // 8 * bits : -(-stop // 8) * bits]
            idx = unpack_bytes(packed, bits)[: stop - start].to(torch.int32)
            if lay.groups > 1 and unit % per_group == 0:
                idx = self._lut_rows(idx.view(-1, per_group), start // per_group, per_group).view(-1)
            elif lay.groups > 1:
                group = torch.arange(start, stop, device=idx.device, dtype=torch.int32) // per_group
                idx += group * lay.n_clusters
            torch.index_select(lut, 0, idx, out=vectors[start:stop])
        scale = self.weight_scale.float() if self.has_scale else None
        return lay.weight_from_vectors(vectors, scale).to(self.compute_dtype).contiguous()

    @torch.no_grad()
    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of an untransposed weight (an Embedding's tokens), (len(rows), features), reading only their
        indices when a row's indices fill whole bytes; otherwise rows of the whole decoded weight."""
        lay = self.layout
        per_row = lay.features // lay.cluster_dim
        if lay.transposed or self.tied_source is not None or (per_row * lay.bits) % 8:
            return self.decode().reshape(lay.channels, -1)[rows]
        packed = self.weight_indices.view(lay.channels, per_row * lay.bits // 8)[rows]
        idx = unpack_bytes(packed, lay.bits).to(torch.int32)
        if lay.groups > 1:
            idx += (rows.to(torch.int32) // (lay.channels // lay.groups) * lay.n_clusters).unsqueeze(-1)
        lut = self.weight_lut.to(self._decode_dtype()).reshape(-1, lay.cluster_dim)
        out = torch.index_select(lut, 0, idx.view(-1)).view(len(rows), lay.features)
        if self.has_scale:
            out = out * self.weight_scale.float()[rows]
        return out.to(self.compute_dtype)

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
        if self.inference_mode == "packed" and isinstance(self, nn.Embedding) and self.tied_source is None:
            tokens, inverse = torch.unique(x, return_inverse=True)  # decode the rows this batch looks up, only
            return F.embedding(inverse, self.decode_rows(tokens), None, self.max_norm, self.norm_type)
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
