"""Inference-time palettized weights: a lookup table plus packed b-bit indices in place of a parameter.

For a palettized parameter `p` of module `m` the state dict holds (see `Layout`; for `p = weight`: `m.weight_lut`...)

    m.p_lut      (groups, 2**bits, cluster_dim)   float16 by default
    m.p_indices  uint8, the (groups, n) nearest-centroid indices packed by `ops.packing.pack_indices`
    m.p_scale    (channels, 1)                    only with per-channel scales

and the weight is W = from_rows(lut[g, idx] * scale). The module keeps its own class and forward: its class becomes a
subclass (`weights.variant_class`) in which `p` is a property returning the decoded weight, so the module's own
forward (and anything else reading `m.p`) sees the weight the checkpoint holds. Two inference modes:

    "packed"  (the default) keep only LUT + indices and decode in every forward (once, however often it reads the
              weight; each thread its own): the smallest memory;
    "dense"   decode once, on the first forward, and keep the decoded weight: the forward costs the original's, the
              memory the decoded weight's on top of the checkpoint's.

On CPU the decode runs in `ops.native`'s kernels when available (bit for bit the torch decode). A packed plain Linear
(or Conv1D) with float32 input and at most `GEMV_MAX_ROWS` rows (batch-1 generation; not under autocast) never
decodes its weight: the fused LUT gemv reads the indices (the decoded weight's output up to summation order). LUTs and
scales keep their dtype through `model.to(dtype)`, `.half()`, `.bfloat16()`: the cast sets the decode's
`compute_dtype`, so a cast model saves the same checkpoint it loaded from.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..ops import native
from ..ops.linear import recomputed_linear
from ..ops.packing import unpack_bytes
from .layout import Layout, vector_groups
from .weights import (
    _rebuild,
    apply_keeping_dtype,
    base_class,
    buffer_name,
    describe_weights,
    only_weight,
    refuse_tracing,
    set_tie,
    swap_class,
    variant_class,
    version,
    weight_name,
)

MODES = ("dense", "packed")
# Packed by default: the model holds its checkpoint's bytes plus one decoded weight at a time, as fast as dense mode
DEFAULT_MODE = "packed"  # on CPU with the native kernels (README, "What packed mode costs")
DECODE_SLICE = 1 << 18  # vectors decoded at a time (a multiple of 8)
KINDS, KEPT_DTYPE_KINDS = ("lut", "indices", "scale"), ("lut", "scale")
GEMV_MAX_ROWS = 8  # packed Linear inputs of at most this many rows use the fused LUT gemv (CPU, float32)
# weight -> (state key, native Palette or None); outside the objects so copies and pickles never see ctypes objects
_PALETTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LINEAR_FORWARDS = (nn.Linear.forward, Conv1D.forward)  # what the packed fast paths compute (not a subclass's own)
_THREAD = threading.local()  # .scopes: module -> {param: its weight decoded in this thread's forward} (decode_scope)


class PalettizedWeight:
    """One palettized parameter `param` of `module`: layout, LUT, packed indices and the decode."""

    loads = 0  # state dicts loaded into the module: part of the state key (inference tensors bump no version)

    def __init__(
        self,
        module: nn.Module,
        param: str,
        layout: Layout,
        compute_dtype: torch.dtype,
        tied_source: PalettizedWeight | None = None,
    ):
        self.module, self.param, self.layout = module, param, layout
        self.inference_mode, self.compute_dtype, self._dense = DEFAULT_MODE, compute_dtype, None
        self.placeholder: torch.Tensor | None = None  # what the weight reads as while a checkpoint loads into it
        set_tie(self, tied_source)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dense": None}

    def buffer(self, kind: str) -> str:
        return buffer_name(self.param, kind)

    def register(self, lut_dtype: torch.dtype, device: torch.device) -> None:
        """Uninitialised buffers of the layout's shapes, to be filled by a state dict or `fill`."""
        if self.tied_source is not None:
            return
        layout, register = self.layout, self.module.register_buffer
        with torch.inference_mode(False):  # normal tensors even under inference_mode: writes must bump their versions
            register(self.buffer("lut"), torch.empty(layout.lut_shape, dtype=lut_dtype, device=device))
            register(self.buffer("indices"), torch.empty(layout.packed_bytes, dtype=torch.uint8, device=device))
            if layout.per_channel_scale:
                register(self.buffer("scale"), torch.empty(layout.scale_shape, dtype=lut_dtype, device=device))

    def buffer_names(self) -> tuple[str, ...]:
        return tuple(self.buffer(kind) for kind in KINDS)

    weight_lut = property(lambda self: self.module._buffers[self.buffer("lut")])
    weight_indices = property(lambda self: self.module._buffers[self.buffer("indices")])
    weight_scale = property(lambda self: self.module._buffers.get(self.buffer("scale")))
    has_scale = property(lambda self: self.weight_scale is not None)

    @torch.no_grad()
    def fill(self, lut: torch.Tensor, packed_indices: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        self.weight_lut.copy_(lut)
        self.weight_indices.copy_(packed_indices)
        if scale is not None:
            self.weight_scale.copy_(scale)
        self._dense = None

    def _lut_rows(self, idx: torch.Tensor, first_group, per_group: int) -> torch.Tensor:
        """Turn indices (..., per_group) of consecutive groups starting at `first_group` (an int or a tensor of the
        first dimension's groups) into rows of the flattened (groups * k, d) LUT."""
        if self.layout.groups == 1:
            return idx
        groups = first_group + torch.arange(idx.shape[0], device=idx.device, dtype=idx.dtype)
        return idx.add_((groups * self.layout.n_clusters).unsqueeze(-1)) if per_group else idx

    def _decode_dtype(self) -> torch.dtype:  # gathered in the compute dtype where exact (no scale), else float32
        exact = not self.has_scale and self.compute_dtype in (torch.float32, torch.float16, torch.bfloat16)
        return self.compute_dtype if exact else torch.float32

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """The dense weight, in `compute_dtype`, decoded in slices so temporaries stay small."""
        if self.tied_source is not None:
            return self.tied_source.value().view(self.layout.shape)
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
                idx += vector_groups(start, stop, per_group, idx.device) * lay.n_clusters
            torch.index_select(lut, 0, idx, out=vectors[start:stop])
        scale = self.weight_scale.float() if self.has_scale else None
        return lay.weight_from_vectors(vectors, scale).to(self.compute_dtype).contiguous()

    @torch.no_grad()
    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of an untransposed 2-D weight (an Embedding's tokens), (len(rows), features), reading only
        their indices when a row's indices fill whole bytes; otherwise rows of the whole decoded weight."""
        lay = self.layout
        per_row = lay.features // lay.cluster_dim
        palette = None if lay.transposed or self.tied_source is not None else self._native_palette()
        if palette is not None:
            return native.decode_rows(palette, rows)
        if lay.transposed or self.tied_source is not None or (per_row * lay.bits) % 8:
            return self.decode().reshape(lay.channels, -1).index_select(0, rows.reshape(-1))
        row_bytes = per_row * lay.bits // 8  # index_select: a negative id is an IndexError, as in nn.Embedding
        packed = self.weight_indices[: lay.channels * row_bytes].view(lay.channels, row_bytes).index_select(0, rows)
        idx = unpack_bytes(packed, lay.bits).to(torch.int32)
        if lay.groups > 1:
            idx += (rows.to(torch.int32) // (lay.channels // lay.groups) * lay.n_clusters).unsqueeze(-1)
        lut = self.weight_lut.to(self._decode_dtype()).reshape(-1, lay.cluster_dim)
        out = torch.index_select(lut, 0, idx.view(-1)).view(len(rows), lay.features)
        if self.has_scale:
            out = out * self.weight_scale.float()[rows]
        return out.to(self.compute_dtype)

    def _native_palette(self) -> native.Palette | None:
        """The native kernels' view of this weight (its tied source's LUT and indices for a tied weight), decoding
        to `compute_dtype`; None off CPU, without the kernels, or for what they do not cover."""
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

    def packed_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The fused LUT gemv y = x W^T + bias for a few float32 CPU rows of input, or None."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.compute_dtype != torch.float32:
            return None
        grad = x.requires_grad and torch.is_grad_enabled()
        # under autocast, F.linear on the decoded weight gives autocast's dtype
        if torch.is_autocast_enabled("cpu") or grad or x.dim() == 0 or x.numel() > GEMV_MAX_ROWS * x.shape[-1]:
            return None
        palette = self._native_palette()
        if palette is None or x.shape[-1] != palette.shape[1]:
            return None
        if bias is not None and (bias.requires_grad and torch.is_grad_enabled() or bias.device.type != "cpu"):
            return None  # F.linear's path: a bias's gradient, or a bias elsewhere (an error there, as nn.Linear's)
        return native.lut_gemv(palette, x, bias.detach() if bias is not None else None)

    def _state_key(self) -> tuple:
        """Changes whenever a buffer is replaced or written (loading a checkpoint does either)."""
        source = self.tied_source if self.tied_source is not None else self
        tensors = (source.module._buffers.get(n) for n in source.buffer_names())
        return (source.loads, *((t.data_ptr(), version(t)) for t in tensors if t is not None))

    def value(self) -> torch.Tensor:
        """The weight the module reads: decoded once and kept ("dense"), or decoded now ("packed")."""
        if self.placeholder is not None:
            return self.placeholder
        if self.inference_mode == "packed":
            return self.decode()
        key = self._state_key()
        if self._dense is None or self._dense[0] != (key, self._dense[1]._version):  # also if written in place
            with torch.inference_mode(False):  # a normal tensor even under inference_mode: it is kept (and versioned)
                weight = self.decode()
            self._dense = ((key, weight._version), weight)
        return self._dense[1]

    weight = property(lambda self: self.value(), doc="The weight, as the module reads it (`value()`).")

    @property
    def decoded_bytes(self) -> int:
        """Bytes held by the kept decoded weight ("dense" mode after a forward), else 0."""
        return 0 if self._dense is None else self._dense[1].nbytes

    def set_inference_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"inference mode must be one of {list(MODES)}, got {mode!r}")
        self.inference_mode, self._dense = mode, None

    def describe(self) -> str:
        lay = self.layout
        return (
            f"{self.param}: shape={lay.shape}, palettized(bits={lay.bits}, cluster_dim={lay.cluster_dim}, "
            f"groups={lay.groups}, mode={self.inference_mode}{', tied' if self.tied_source is not None else ''})"
        )


def _weight_property(param: str) -> property:
    def get(module):
        scope = getattr(_THREAD, "scopes", {}).get(module)  # in a forward: decoded once, however often it is read
        if scope is None:
            return module.palettized_weights[param].value()
        return scope[param] if param in scope else scope.setdefault(param, module.palettized_weights[param].value())

    return property(get, doc=f"`{param}`, decoded from its LUT and packed indices")


class PalettizedMixin:
    """The class mixed into a module holding palettized weights (`module.palettized_weights`: parameter ->
    PalettizedWeight); `isinstance(m, nn.Linear)` etc. still holds, and each palettized parameter is a property that
    decodes it. For a module with one palettized weight, `m.layout`, `m.decode()`, ... read that weight's."""

    prefix = "Palettized"
    palettized_weights: dict[str, PalettizedWeight]

    @classmethod
    def class_attributes(cls, params: tuple[str, ...]) -> dict:
        return {param: _weight_property(param) for param in params}

    @classmethod
    def attach(cls, module: nn.Module, weights: dict[str, PalettizedWeight]) -> nn.Module:
        """Make `module` (in place) hold the palettized weights `weights`; their parameters are dropped."""
        for param in weights:
            module._parameters.pop(param, None)
        current = dict(getattr(module, "palettized_weights", {}))
        current.update(weights)
        swap_class(module, variant_class(cls, base_class(module), tuple(sorted(current))))
        module.palettized_weights = current
        return module

    def detach_palettized(self, weights: dict[str, torch.Tensor | None]) -> nn.Module:
        """The module back in its own class, holding `weights` (parameter -> tensor, or None to leave the parameter
        out), every palettized buffer and attribute dropped."""
        for state in self.palettized_weights.values():
            for name in state.buffer_names():
                self._buffers.pop(name, None)
        del self.palettized_weights
        swap_class(self, base_class(self))
        for param, tensor in weights.items():
            if tensor is not None:
                setattr(self, param, tensor)
        return self

    def __setattr__(self, name, value):
        if name in self.__dict__.get("palettized_weights", ()):  # torch's own errors name no cause ("already exists")
            raise AttributeError(
                f"{type(self).__name__}.{name} is decoded from its LUT and packed indices and cannot be assigned: "
                "dequantize the model (model.dequantize()) to give it dense weights"
            )
        super().__setattr__(name, value)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (__name__, "PalettizedMixin", base_class(self), type(self)._dkm_params), self.__getstate__())

    def _apply(self, fn, recurse=True):
        kept = tuple(w.buffer(kind) for w in self.palettized_weights.values() for kind in KEPT_DTYPE_KINDS)
        apply = lambda f: super(PalettizedMixin, self)._apply(f, recurse)  # noqa: E731
        first = next(iter(self.palettized_weights.values()))
        dtype = apply_keeping_dtype(self, fn, kept, apply, first.compute_dtype).dtype
        for state in self.palettized_weights.values():
            state.compute_dtype, state._dense = dtype, None
            _PALETTES.pop(state, None)  # it holds the buffers it was made from (on CPU before a move)
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # a new state key, the tied weights' too (`_state_key`)
        super()._load_from_state_dict(*args, **kwargs)
        for state in self.palettized_weights.values():
            state.loads += 1
            _PALETTES.pop(state, None)

    @contextlib.contextmanager
    def decode_scope(self):
        """Within the context each palettized parameter is decoded at most once (e.g. a loop over experts)."""
        scopes = vars(_THREAD).setdefault("scopes", {})  # per thread: another's decodes may be inference tensors
        if self in scopes:
            yield
            return
        scopes[self] = {}
        try:
            yield
        finally:
            del scopes[self]

    def _packed_forward(self, args, kwargs) -> torch.Tensor | None:
        """The packed fast paths of plain Linear / Conv1D / Embedding forwards, or None."""
        state = self.palettized_weights.get("weight")
        if state is None or state.inference_mode != "packed" or kwargs or len(args) != 1:
            return None
        (x,) = args
        forward = base_class(self).forward
        if forward is nn.Embedding.forward and state.tied_source is None and state.layout.channel_dims == 1:
            if x.is_meta:  # no torch.unique on the meta device: the decoded weight's shapes
                return None
            tokens, inverse = torch.unique(x, return_inverse=True)  # decode the rows this batch looks up, only
            return F.embedding(inverse, state.decode_rows(tokens), None, self.max_norm, self.norm_type)
        if forward in _LINEAR_FORWARDS:
            out = state.packed_linear(x, self.bias)
            if out is None and torch.is_grad_enabled() and x.requires_grad:  # adapters training on top (LoRA)
                out = recomputed_linear(x, state.decode, self.bias, transposed=state.layout.transposed)
            return out
        return None

    def forward(self, *args, **kwargs):
        refuse_tracing(self)
        out = self._packed_forward(args, kwargs)
        if out is not None:
            return out
        with self.decode_scope():
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return describe_weights(super().extra_repr(), self.palettized_weights)

    # -- the per-weight API of a module with one palettized weight ---------------------------------------------------
    def _only(self) -> PalettizedWeight:
        return only_weight(self, self.palettized_weights, "palettized_weights")

    layout = property(lambda self: self._only().layout)
    # the module whose weight this one shares (its weight's `tied_source` is that weight)
    tied_source = property(lambda self: getattr(self._only().tied_source, "module", None))
    inference_mode = property(lambda self: self._only().inference_mode)
    compute_dtype = property(lambda self: self._only().compute_dtype)

    def decode(self) -> torch.Tensor:
        return self._only().decode()

    def set_inference_mode(self, mode: str) -> None:
        for state in self.palettized_weights.values():
            state.set_inference_mode(mode)


def palettized_modules(model: nn.Module) -> list[tuple[str, PalettizedWeight]]:
    """(name, state) of every palettized weight of `model`, in model order (names as `weights.weight_name`)."""
    return [
        (weight_name(module_name, param), state)
        for module_name, module in model.named_modules()
        if isinstance(module, PalettizedMixin)
        for param, state in module.palettized_weights.items()
    ]
