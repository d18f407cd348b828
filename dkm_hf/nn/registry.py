"""The one registry of module types dkm_hf clusters, and what the DKM and palettized variants of them share.

A type is registered with the function that computes its forward from a given weight:

    @register_module(nn.Linear)
    def _linear(module, x, weight):
        return F.linear(x, weight, module.bias)

`DKMLinear`, `PalettizedLinear`, ... are made from the registry (`variant_class(DKMMixin, nn.Linear)`), so a new
type needs one registration and nothing else. Modules are matched by isinstance: subclasses of a registered type are
clustered as that type.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ModuleType:
    base: type
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    transposed: bool  # the weight is stored (features, channels), as transformers' Conv1D does


_REGISTRY: dict[type, ModuleType] = {}
_VARIANTS: dict[tuple[type, type], type] = {}


def register_module(base: type, transposed: bool = False):
    """Register `base` (a module type with a `weight` parameter) with its functional forward."""

    def decorator(forward):
        _REGISTRY[base] = ModuleType(base, forward, transposed)
        return forward

    return decorator


def supported_types() -> tuple[type, ...]:
    return tuple(_REGISTRY)


def module_type(module: nn.Module) -> ModuleType | None:
    """The registration `module` is an instance of (the most derived registered type), or None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def functional_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`module`'s own forward computation, with `weight` in place of its weight parameter."""
    kind = module_type(module)
    if kind is None:
        raise TypeError(f"dkm_hf does not support {type(module).__name__}")
    return kind.forward(module, x, weight)


def variant_class(mixin: type, base: type) -> type:
    """The class `<mixin.prefix><Base>` deriving from `mixin` and the registered `base` (made once, picklable)."""
    key = (mixin, base)
    if key not in _VARIANTS:
        name = f"{mixin.prefix}{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": mixin.__module__, "__qualname__": name})
        setattr(sys.modules[mixin.__module__], name, cls)
        _VARIANTS[key] = cls
    return _VARIANTS[key]


def swap_class(module: nn.Module, cls: type, drop_buffers=(), drop_attrs=()) -> nn.Module:
    """A new `cls` instance sharing `module`'s parameters, buffers, submodules and attributes (no data is copied),
    without the named buffers and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    for key in drop_buffers:
        new._buffers.pop(key, None)
    for key in drop_attrs:
        new.__dict__.pop(key, None)
    return new


def set_tie(module: nn.Module, source: nn.Module | None) -> None:
    """`module.tied_source = source` without registering `source` as a submodule (it lives elsewhere in the model)."""
    object.__setattr__(module, "tied_source", source)


def apply_keeping_dtype(
    module: nn.Module, fn, names: tuple[str, ...], apply, probe_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Run nn.Module._apply (`apply(fn)`) on `module` but only move the buffers `names` between devices, never cast
    them: `model.to(torch.bfloat16)` must not round centroids or LUTs. Returns what `fn` makes of an empty tensor of
    `probe_dtype`, so the caller can follow the cast elsewhere."""
    order = list(module._buffers)
    kept = [(name, module._buffers.pop(name)) for name in names if module._buffers.get(name) is not None]
    try:
        apply(fn)
    finally:
        for name, tensor in kept:
            moved = fn(tensor)
            if moved.dtype != tensor.dtype:
                moved = moved.to(tensor.dtype) if tensor.is_meta else tensor.to(moved.device)
            module._buffers[name] = moved
        for name in order:  # the state dict keeps its order
            module._buffers[name] = module._buffers.pop(name)
    device = kept[0][1].device if kept else torch.device("cpu")
    return fn(torch.empty(0, dtype=probe_dtype, device=device))


@register_module(nn.Linear)
def _linear(module, x, weight):
    return F.linear(x, weight, module.bias)


@register_module(nn.Conv1d)
@register_module(nn.Conv2d)
@register_module(nn.Conv3d)
def _conv(module, x, weight):
    return module._conv_forward(x, weight, module.bias)


@register_module(Conv1D, transposed=True)
def _conv1d_transformers(module, x, weight):
    out = torch.addmm(module.bias, x.reshape(-1, x.size(-1)), weight)
    return out.view(*x.shape[:-1], module.nf)


@register_module(nn.Embedding)
def _embedding(module, x, weight):
    return F.embedding(
        x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
    )
