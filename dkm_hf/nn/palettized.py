"""Inference-time palettized modules: a lookup table plus packed b-bit indices in place of the weight.

For a clustered module `m` the state dict holds (see `Layout`)

    m.weight_lut      (groups, 2**bits, cluster_dim)   float16 by default
    m.weight_indices  uint8, the (groups, n) nearest-centroid indices packed by `ops.packing.pack_indices`
    m.weight_scale    (channels, 1)                    only with per-channel scales

and the weight is W = from_rows(lut[g, idx] * scale). Two inference modes:

    "dense"   decode once, on the first forward, and keep the decoded weight: the forward costs the original's;
    "packed"  keep only LUT + indices in memory and decode in every forward: the smallest memory.

On CPU the decode runs in the native kernels of `ops.native` when they are available (else in torch): the same
weight bit for bit, so "dense" mode and large packed-mode inputs give exactly the torch path's outputs. A packed
Linear (or Conv1D) with float32 input and compute dtype and at most `GEMV_MAX_ROWS` rows of input (batch-1 generation)
never decodes its weight: the fused LUT matrix-vector product reads the indices directly; its outputs equal the
decoded weight's within float32 summation-order tolerance (the sums run in another order than the BLAS GEMM).

LUTs and scales keep their stored dtype through `model.to(dtype)`, `.half()`, `.bfloat16()`: the cast sets the
dtype the weight is decoded to (`compute_dtype`), so a cast model saves the same checkpoint it loaded from.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import native
from ..ops.packing import unpack_bytes
from .layout import Layout
from .registry import apply_keeping_dtype, functional_forward, module_type, set_tie, swap_class, variant_class

MODES = ("dense", "packed")
DECODE_SLICE = 1 << 18  # vectors decoded at a time (a multiple of 8)
BUFFERS = ("weight_lut", "weight_indices", "weight_scale")
_KEPT_DTYPE = ("weight_lut", "weight_scale")
_ATTRS = ("layout", "inference_mode", "compute_dtype", "tied_source", "_dense")
GEMV_MAX_ROWS = 8  # packed Linear inputs of at most this many rows use the fused LUT gemv (CPU, float32)
# module -> (state key, native Palette or None); outside the module so copies and pickles never see it
_PALETTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
        palette = self._native_palette()
        if palette is not None:
            return self.layout.from_rows(native.decode_rows(palette)).contiguous()
        return self._decode_torch()

    def _decode_torch(self) -> torch.Tensor:
        """`decode` in torch (any device and dtype): the reference of the native kernels."""
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
        if lay.transposed or self.tied_source is not None:
            return self.decode().reshape(lay.channels, -1)[rows]
        palette = self._native_palette()
        if palette is not None:
            return native.decode_rows(palette, rows)
        if (per_row * lay.bits) % 8:
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

    def _native_palette(self) -> native.Palette | None:
        """The native kernels' view of this module's weight (its tied source's LUT and indices for a tied module),
        decoding to `compute_dtype`; None off CPU, without the kernels, or for what they do not cover."""
        source = self.tied_source if self.tied_source is not None else self
        if source.weight_lut.device.type != "cpu" or not native.enabled():
            return None
        key = (self._state_key(), self.compute_dtype)
        cached = _PALETTES.get(self)
        if cached is not None and cached[0] == key:
            return cached[1]
        palette = None
        if native.available() and source.layout.transposed == self.layout.transposed:
            lay, dtype = source.layout, self.compute_dtype
            scale = source.weight_scale.reshape(-1) if source.has_scale else None
            palette = native.make_palette(
                source.weight_indices, source.weight_lut, scale, lay.bits, lay.channels, lay.features, dtype
            )
        _PALETTES[self] = (key, palette)
        return palette

    def _packed_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused LUT gemv of a packed Linear / Conv1D for a few float32 CPU rows of input, or None."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.compute_dtype != torch.float32:
            return None
        if x.dim() == 0 or x.numel() > GEMV_MAX_ROWS * x.shape[-1] or (x.requires_grad and torch.is_grad_enabled()):
            return None
        kind = module_type(self)
        if not (kind.base is nn.Linear or kind.transposed):
            return None
        palette = self._native_palette()
        if palette is None or x.shape[-1] != palette.shape[1]:
            return None
        bias = self.bias
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return None
        return native.lut_gemv(palette, x, bias.detach() if bias is not None else None)

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
            with torch.inference_mode(False):  # a normal tensor even under inference_mode: it is kept (and versioned)
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
        if self.inference_mode == "packed":
            out = self._packed_linear(x)
            if out is not None:
                return out
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
