"""What the DKM and palettized forms of a clustered weight share: naming, the module classes they live in, dtypes.

The unit of clustering is a weight: any parameter of two or more dimensions (a Linear's, Conv's or Embedding's
`weight`, the stacked experts `gate_up_proj` of a mixture-of-experts layer, ...). The module that holds it keeps its
own class and forward: its class becomes a generated subclass (`variant_class`) of that very class, so `isinstance`,
subclass behaviour (a scaled embedding's `embed_scale`, extra forward arguments, a router's tuple output) and every
other attribute stay as they are. The subclass only changes where the forward's weight comes from.

A clustered weight is named by its module and parameter, the way config.json records it: the module's name for a
parameter called `weight` ("model.layers.0.mlp.down_proj"), `module.parameter` otherwise
("model.layers.0.mlp.experts.gate_up_proj"). A name is unambiguous: a module cannot have a submodule and a parameter
of the same name. The buffers of a weight `p` are `p_lut`, `p_indices`, `p_scale` (palettized) and `p_centroids`,
`p_scale` (DKM; `centroids` for `weight`, as written by every earlier release).
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref

import torch
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch without distributed tensors
    DTensor = None
try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch: no FSDP2, nothing to gather
    FSDPModule = ()

STACKED_NDIM = 3  # a 3-D parameter not called `weight`: stacked experts, one LUT (at least) per expert

_VARIANTS: dict[tuple[type, type, tuple[str, ...]], type] = {}
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its forward's lock (module_lock)
_SAVE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its saves' lock (save_lock)
_LOCKS_GUARD = threading.Lock()


def _lock(registry: weakref.WeakKeyDictionary, module: nn.Module) -> threading.RLock:
    """`module`'s re-entrant lock in `registry`: kept outside the module, so copies and pickles of it are unaffected
    and each copy has its own."""
    lock = registry.get(module)
    if lock is None:
        with _LOCKS_GUARD:
            lock = registry.setdefault(module, threading.RLock())
    return lock


def module_lock(module: nn.Module) -> threading.RLock:
    """The lock of a module whose parameters are shadowed during a forward: two threads running one model take turns
    in that module (each shadow is an instance attribute every thread sees)."""
    return _lock(_LOCKS, module)


def save_lock(model: nn.Module) -> threading.RLock:
    """The lock two threads saving one model take turns with (each save records its id in the model's config); apart
    from `module_lock`, so forwards go on during a save."""
    return _lock(_SAVE_LOCKS, model)


def refuse_tracing(module: nn.Module, jit: bool = False) -> None:
    """torch.fx's symbolic trace and torch.export cannot follow a clustered weight: fx baked it into the graph as a
    constant (the parameters gone from the traced module, later updates ignored), export failed inside its checks;
    `jit`: torch.jit.trace too (a traced DKM module drifted from eager in training and failed in eval)."""
    if (
        torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.compiler.is_exporting()
        or (jit and torch.jit.is_tracing())
    ):
        raise RuntimeError(
            f"dkm_hf: a {type(module).__name__} cannot be traced by torch.fx, torch.jit.trace or torch.export: its "
            "clustered weight is computed (soft or hard in training, decoded from its LUT when palettized) and would "
            "be frozen into the graph. Trace the dense model (dkm_hf.dequantize(model)), or export to Core ML with "
            "dkm_hf.export.to_coreml, which keeps the LUTs"
        )


def version(tensor: torch.Tensor) -> int:
    """A tensor's in-place write counter; -1 for an inference tensor (made under torch.inference_mode), which has
    none and cannot be written outside it."""
    return -1 if tensor.is_inference() else tensor._version


def _pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    # detached (the same storage and version counter): an op's own output saved with its grad_fn holds that node, a
    # cycle in C++ that only backward breaks (a forward without backward leaked its graph)
    return tensor.detach(), tensor._version


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The check autograd makes for the tensors it saves itself, for those a saved-tensor hook keeps as they are."""
    tensor, saved_version = packed
    if tensor._version != saved_version:
        raise RuntimeError(
            f"a tensor of shape {tuple(tensor.shape)} saved by the DKM loop for backward was modified in place "
            "before backward ran (e.g. the weight or the centroids changed between forward and backward)"
        )
    return tensor


def weight_name(module_name: str, param: str) -> str:
    """The name of parameter `param` of module `module_name` in config.json and in every dkm_hf listing."""
    if param == "weight" and module_name:
        return module_name
    return f"{module_name}.{param}" if module_name else param


def split_name(model: nn.Module, name: str) -> tuple[str, str]:
    """(module name, parameter name) of a clustered weight's name; raises AttributeError if the model has neither."""
    try:
        model.get_submodule(name)
        return name, "weight"
    except AttributeError:
        pass
    module_name, _, param = name.rpartition(".")
    model.get_submodule(module_name)
    return module_name, param


def parameter_keys(model: nn.Module, attribute: str) -> list[str]:
    """The state-dict names (`module.param`) of the weights every module of `model` holds in its dict `attribute`
    ("dkm_weights" or "palettized_weights"), in model order."""
    return [
        f"{name}.{param}" if name else param
        for name, module in model.named_modules()
        for param in getattr(module, attribute, None) or ()
    ]


def buffer_name(param: str, kind: str) -> str:
    """The buffer of weight `param`: kind is "lut", "indices", "scale" or "centroids"."""
    if kind == "centroids" and param == "weight":
        return "centroids"
    return f"{param}_{kind}"


# Stacked experts stored (experts, in, out) and applied as x @ W[e] whose classes do not say so with transformers'
# `use_experts_implementation(is_transposed=True)` (which sets `module.is_transposed`).
INPUT_MAJOR_EXPERTS = {"Llama4TextExperts"}


def is_transposed(module: nn.Module, param: str = "weight") -> bool:
    """Whether a weight is stored inputs first: transformers' Conv1D (in, out), and stacked experts (experts, in, out)
    (GPT-OSS and Aria declare it with `is_transposed`, Llama4's experts by their class)."""
    if param == "weight":
        return isinstance(module, Conv1D)
    parameter = module._parameters.get(param)
    if parameter is None or parameter.dim() != STACKED_NDIM:
        return False
    return getattr(module, "is_transposed", False) is True or base_class(module).__name__ in INPUT_MAJOR_EXPERTS


def channel_dims(param: str, ndim: int) -> int:
    """How many leading dimensions of the parameter index its output channels: 2 for stacked experts, else 1."""
    return 2 if ndim == STACKED_NDIM and param != "weight" else 1


def only_weight(module: nn.Module, states: dict, attribute: str):
    """The state of the one weight a module's per-module API (`module.layout`, ...) stands for; an AttributeError
    naming them where the module has several (`attribute` is the dict that holds them by parameter name)."""
    if len(states) != 1:
        raise AttributeError(
            f"{type(module).__name__} has {len(states)} weights in {attribute} ({sorted(states)}): use "
            f"module.{attribute}[name]"
        )
    return next(iter(states.values()))


def describe_weights(module_repr: str, states: dict) -> str:
    """A module's extra_repr: its class's own, then a description of each of its clustered / palettized weights."""
    return ", ".join([module_repr, *(state.describe() for state in states.values())]).strip(", ")


def base_class(module: nn.Module) -> type:
    """The user's own class of a module, under any dkm_hf variant."""
    return getattr(type(module), "_dkm_base", type(module))


def variant_class(mixin: type, base: type, params: tuple[str, ...]) -> type:
    """`<mixin.prefix><Base>` (a model keeps its own name): a subclass of `base` (the module's own class) and `mixin`,
    made once per (mixin, base, clustered parameters). `mixin.class_attributes(params)` makes the class attributes of
    the clustered parameters, if the mixin needs them. Instances pickle through `_rebuild` (after `import dkm_hf`)."""
    key = (mixin, base, params)
    if key not in _VARIANTS:
        # a model keeps its own name: transformers records it in config.json's `architectures`
        name = base.__name__ if issubclass(base, PreTrainedModel) else f"{mixin.prefix}{base.__name__}"
        namespace = {"__module__": mixin.__module__, "__qualname__": name, "_dkm_base": base, "_dkm_params": params}
        namespace["__new__"] = _new_as_base
        namespace.update(mixin.class_attributes(params))
        _VARIANTS[key] = type(name, (mixin, base), namespace)
    return _VARIANTS[key]


def _new_as_base(cls, *args, **kwargs):
    """A variant class called with arguments builds its base class (peft makes LoRA's Conv2d adapters as
    `type(base_layer)(...)`): only dkm_hf's conversions give a module clustered or palettized weights. Without them
    (pickling, `nn.DataParallel`'s replicas) it makes the variant itself."""
    if args or kwargs:
        return cls._dkm_base(*args, **kwargs)
    variant = next(c for c in cls.__mro__ if "_dkm_base" in c.__dict__)  # cls may subclass it (torch's parametrize)
    return super(variant, cls).__new__(cls)


def _rebuild(mixin_module: str, mixin_name: str, base: type, params: tuple[str, ...]) -> nn.Module:
    """An empty instance of a variant class (pickle fills its __dict__)."""
    mixin = getattr(sys.modules[mixin_module], mixin_name)
    cls = variant_class(mixin, base, params)
    return cls.__new__(cls)


def swap_class(module: nn.Module, cls: type) -> None:
    """Change `module`'s class in place (the same object: parents, optimisers and hooks keep pointing at it). An
    accelerate hook is re-attached, so that it wraps the new class's forward."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        remove_hook_from_module(module)
        module.__dict__.pop("forward", None)  # the removed hook leaves the old class's bound forward behind
    module.__class__ = cls
    if hook is not None:
        add_hook_to_module(module, hook)


def set_tie(owner, source) -> None:
    """`owner.tied_source = source` without registering it as a submodule (it lives elsewhere in the model)."""
    object.__setattr__(owner, "tied_source", source)


def apply_keeping_dtype(
    module: nn.Module, fn, names: tuple[str, ...], apply, probe_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Run nn.Module._apply (`apply(fn)`) on `module` but only move the buffers `names` between devices, never cast
    them: `model.to(torch.bfloat16)` must not round centroids or LUTs. Returns what `fn` makes of an empty tensor of
    `probe_dtype`, so the caller can follow the cast elsewhere."""
    kept = [module._buffers[name] for name in names if module._buffers.get(name) is not None]
    ids = {id(tensor) for tensor in kept}

    def keeping(tensor: torch.Tensor) -> torch.Tensor:
        moved = fn(tensor)
        if id(tensor) in ids and moved.dtype != tensor.dtype:
            moved = moved.to(tensor.dtype) if tensor.is_meta else tensor.to(moved.device)
        return moved

    # the buffers stay in place meanwhile: a module's own _apply may read its weights (an RNN's flat weights)
    apply(keeping)
    device = kept[0].device if kept else torch.device("cpu")
    return fn(torch.empty(0, dtype=probe_dtype, device=device))


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards (a part of) `model`."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_whole(tensor: torch.Tensor) -> bool:
    """False for a parameter FSDP2 holds sharded (outside its unit's forward): only whole weights are clustered."""
    return not (DTensor is not None and isinstance(tensor, DTensor))


class HardWeightGradient(torch.autograd.Function):
    """The hard weight an eval() forward computes with, in the graph of the weight it snaps: nothing reaches the
    weight through it, and a backward that tries says so (a training loop in eval mode trains nothing clustered)."""

    generate_vmap_rule = True  # torch.func transforms (vmap over a model in eval mode)

    @staticmethod
    def forward(hard: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hard.detach()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        warnings.warn(
            "dkm_hf: a DKM model in eval() computes with its hard (snapped) weights, through which no gradient "
            "reaches the clustered weights: call model.train() to train them (in eval mode only the others train)",
            stacklevel=2,
        )
        return None, None
