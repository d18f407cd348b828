"""Core ML export: an .mlpackage whose clustered weights are `constexpr_lut_to_dense` ops holding dkm_hf's own LUTs
and indices (no re-clustering, no float copy of a clustered weight). docs/coreml.md has the user's view.

| dkm_hf layout                        | Core ML ops                                          | targets            |
|---|---|---|
| per-tensor LUT, cluster_dim=1        | constexpr_lut_to_dense                               | iOS16 / macOS13 +  |
| per_grouped_channel (groups > 1)     | constexpr_lut_to_dense, one LUT per channel group    | iOS18 / macOS15 +  |
| cluster_dim > 1 (vector LUT)         | constexpr_lut_to_dense with vector_axis              | iOS18 / macOS15 +  |
| per_channel_scale                    | + constexpr_blockwise_shift_scale (fp32 scale)       | iOS18 / macOS15 +  |

Indices of 5 and 7 bits (3 before iOS18) are stored in the next width Core ML has, the LUT padded with zeros. A
vector LUT needs its vectors along one axis of the weight. Unsupported layouts raise a ValueError naming the modules
before anything is converted. A tied weight is one parameter to `torch.export`: one op that both layers read.

How: the palettized modules are swapped, for the export only, for their plain types holding an uninitialised weight
(never read); `torch.export` traces the model; while coremltools converts it, `TorchConverter._add_const` is wrapped
so that each clustered weight becomes our ops instead of a float const. coremltools (`dkm_hf[coreml]`) is imported
inside the functions, so `import dkm_hf` works without it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from ..nn.dkm import dkm_modules
from ..nn.palettized import PalettizedWeight, palettized_modules
from ..nn.weights import weight_name
from ..ops.packing import unpack_uint8
from ..surgery.convert import plain_modules
from .safetensors_files import saved_variant

METADATA_KEY = "dkm_hf.weights"  # user_defined_metadata: JSON {module name: its constexpr_lut_to_dense op}


@dataclass(frozen=True)
class CoreMLWeight:
    """One clustered weight in Core ML's terms (iOS18 `constexpr_lut_to_dense`; `scale` for
    `constexpr_blockwise_shift_scale`). `indices` has the weight's rank, its `vector_axis` divided by cluster_dim;
    `lut` is (one dim per weight axis: LUT groups along it, 2**bits, cluster_dim)."""

    indices: np.ndarray
    lut: np.ndarray
    vector_axis: int | None
    scale: np.ndarray | None


def _coremltools():
    """coremltools, imported without its import-time warnings (untested torch / scikit-learn, macOS-only proxies)."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools
    finally:
        log.setLevel(level)
    return coremltools


def coreml_target(target=None):
    """A `coremltools.target` from itself, its name ("iOS18", "macOS15") or None (iOS18)."""
    ct = _coremltools()

    if target is None:
        return ct.target.iOS18
    if isinstance(target, str):
        found = getattr(ct.target, target, None)
        if not isinstance(found, ct.target):
            names = ", ".join(t.name for t in ct.target)
            raise ValueError(f"unknown Core ML deployment target {target!r} (one of {names}, or macOS13 ...)")
        return found
    return target


def _problem(module: PalettizedWeight, ios18: bool, ios16: bool) -> str | None:
    """Why Core ML at this target cannot hold `module`'s layout, or None."""
    lay = module.layout
    if not ios16:
        return "Core ML's LUT ops (constexpr_lut_to_dense) need iOS16 / macOS13 or later"
    late = [
        what
        for what, used in (
            (f"{lay.groups} LUT groups", lay.groups > 1),
            (f"cluster_dim={lay.cluster_dim}", lay.cluster_dim > 1),
            ("per-channel scales", lay.per_channel_scale),
        )
        if used
    ]
    if late and not ios18:
        return f"{' and '.join(late)} need(s) iOS18 / macOS15 or later (grouped / vector LUTs, blockwise scale)"
    if lay.channel_dims > 1 and (lay.transposed or lay.groups > lay.stacks or lay.per_channel_scale):
        return (
            f"a weight of {lay.channel_dims} channel axes {tuple(lay.shape)} (stacked experts, a (1, n, d) "
            "embedding) with LUTs per row, per-channel scales or stored (experts, in, out): Core ML's grouped LUT "
            "and scale run along one axis (one LUT per leading index, per_tensor without scales, exports)"
        )
    if lay.cluster_dim > 1 and _vector_axis(lay.shape, lay.transposed, lay.cluster_dim) is None:
        return (
            f"its cluster_dim={lay.cluster_dim} vectors cross an axis of its weight {tuple(lay.shape)}: Core ML "
            "fills a vector along one axis"
        )
    return None


def _vector_axis(shape: tuple[int, ...], transposed: bool, d: int) -> int | None:
    """The weight axis dkm_hf's vectors of d features run along: axis 0 of a transposed (Conv1D) weight, else the
    last axis longer than 1 (the features of a channel are its other axes, flattened), if d divides it."""
    if transposed:
        return 0
    rest = [i for i in range(1, len(shape)) if shape[i] > 1] or [len(shape) - 1]
    return rest[-1] if shape[rest[-1]] % d == 0 else None


def coreml_weight(module: PalettizedWeight, index_bits: int) -> CoreMLWeight:
    """`module`'s LUT, indices and scale laid out on its weight's own axes (`index_bits` >= its bits: padded LUT)."""
    lay = module.layout
    rank, k = len(lay.shape), lay.n_clusters
    rows = unpack_uint8(module.weight_indices, lay.bits, lay.vectors).view(lay.channels, -1).numpy()
    lut = module.weight_lut.detach().cpu()
    lut = (lut.numpy() if lut.dtype in (torch.float16, torch.float32) else lut.float().numpy()).copy()
    lut = np.concatenate([lut, np.zeros((lay.groups, 2**index_bits - k, lay.cluster_dim), lut.dtype)], axis=1)
    axis = _vector_axis(lay.shape, lay.transposed, lay.cluster_dim)
    if lay.transposed:  # stored (features, channels)
        indices, lut_shape, scale_shape = rows.T, (1, lay.groups), (1, lay.channels)
    else:
        index_shape = list(lay.shape)
        index_shape[axis] //= lay.cluster_dim
        indices = rows.reshape(index_shape)
        lut_shape, scale_shape = (lay.groups,) + (1,) * (rank - 1), (lay.channels,) + (1,) * (rank - 1)
    scale = None
    if module.has_scale:
        scale = module.weight_scale.detach().float().cpu().numpy().reshape(scale_shape)
    return CoreMLWeight(
        np.ascontiguousarray(indices),
        lut.reshape(*lut_shape, 2**index_bits, lay.cluster_dim),
        axis if lay.cluster_dim > 1 else None,
        scale,
    )


def coreml_weights(model: nn.Module, target=None) -> dict[str, CoreMLWeight]:
    """{module name: its weight in Core ML's terms} for every palettized module (a tied one shares its source's);
    a ValueError names the modules whose layout `target` (default iOS18) cannot hold."""
    ct = _coremltools()

    target = coreml_target(target)
    ios18, ios16 = target >= ct.target.iOS18, target >= ct.target.iOS16
    modules = palettized_modules(model)
    if dkm_modules(model):
        raise ValueError("the model still holds DKM (training) modules; dkm_hf.palettize(model) it first")
    if not modules:
        raise ValueError("the model has no palettized modules (dkm_hf.palettize(model) or a palettized checkpoint)")
    owners = [(n, m) for n, m in modules if m.tied_source is None]
    refused = [(n, p) for n, m in owners if (p := _problem(m, ios18, ios16)) is not None]
    if refused:
        listed = "; ".join(f"{n}: {p}" for n, p in refused[:3])
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise ValueError(f"Core ML target {target.name} cannot hold these palettized layouts: {listed}{more}")
    allowed = (1, 2, 3, 4, 6, 8) if ios18 else (1, 2, 4, 6, 8)
    converted = {id(m): coreml_weight(m, min(b for b in allowed if b >= m.layout.bits)) for _, m in owners}
    return {n: converted[id(m.tied_source if m.tied_source is not None else m)] for n, m in modules}


def _emit(weight: CoreMLWeight, name: str):
    """The MIL ops of one weight inside the converter, as fp32 like the rest of the torch program (the fp16 pass
    removes the cast again). A scale is emitted in the order coremltools' `canonicalize_quantized_lut_pattern` pass
    wants for the target, so the pass leaves it alone (its rewrite drops vector_axis): before iOS26 the scale
    applies to the LUT, repeated to one LUT per channel (what the pass itself makes); from iOS26 to the weight."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend import _utils as frontend_utils
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.block import is_current_opset_version_compatible_with as at_least

    scale, lut, axis = weight.scale, weight.lut, weight.vector_axis
    if scale is None:
        out = frontend_utils._construct_constexpr_lut_op(weight.indices, lut, axis, f"{name}_lut")
        return out if lut.dtype == np.float32 else mb.cast(x=out, dtype="fp32", name=f"{name}_fp32")
    if at_least(ct.target.iOS26):
        out = frontend_utils._construct_constexpr_lut_op(weight.indices, lut, axis, f"{name}_lut")
        return mb.constexpr_blockwise_shift_scale(data=out, scale=scale, name=f"{name}_scale")  # fp32 out
    channel = int(np.argmax(scale.shape))
    lut = np.repeat(lut, scale.shape[channel] // lut.shape[channel], axis=channel)
    lut = mb.constexpr_blockwise_shift_scale(data=lut, scale=scale.reshape(scale.shape + (1, 1)), name=f"{name}_scale")
    bits = types.string_to_builtin(f"uint{int(np.log2(weight.lut.shape[-2]))}")
    indices = weight.indices.astype(types.nptype_from_builtin(bits))
    options = {} if axis is None else {"vector_axis": axis}
    return mb.constexpr_lut_to_dense(indices=indices, lut=lut, name=f"{name}_lut", **options)  # fp32 out


@contextlib.contextmanager
def _weights_as_lut_ops(by_arg: dict[str, tuple[int, CoreMLWeight]]):
    """While converting, the consts named in `by_arg` become the ops of their weight; the ops of weight i are named
    `<arg>_dkm_hf<i>...`: coremltools' passes add suffixes and reorder LUT and scale ops, the token stays."""
    from coremltools.converters.mil.frontend.torch.converter import TorchConverter

    original = TorchConverter._add_const

    def add_const(self, name, val):
        if name not in by_arg:
            return original(self, name, val)
        i, weight = by_arg[name]
        self.context.add(_emit(weight, f"{name}_dkm_hf{i}"), torch_name=name)

    TorchConverter._add_const = add_const
    try:
        yield
    finally:
        TorchConverter._add_const = original


def _register_missing_torch_ops() -> None:
    """Translations coremltools 9.0 lacks for aten ops transformers 5 emits (registered once, if still missing)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE
    from coremltools.converters.mil.mil import types

    def where_scalarother(context, node):  # torch.where(cond, tensor, scalar): masks
        cond, a, b = _get_inputs(context, node, expected=3)
        value = b.val if hasattr(b, "val") else b
        other = mb.const(val=np.array(value, dtype=types.nptype_from_builtin(a.dtype)))
        context.add(mb.select(cond=mb.cast(x=cond, dtype="bool"), a=a, b=other, name=node.name))

    def new_ones(context, node):  # x.new_ones(size, dtype=): and_masks in transformers' masks (fixed shapes)
        x, size = _get_inputs(context, node, min_expected=2)[:2]
        dtype = getattr(dtype := _get_kwinputs(context, node, "dtype", default=[None])[0], "val", dtype)
        dtype = types.nptype_from_builtin(x.dtype) if dtype is None else NUM_TO_NUMPY_DTYPE[dtype]
        shape = size.val if hasattr(size, "val") else [getattr(s, "val", s) for s in size]
        context.add(mb.const(val=np.ones(shape, dtype=dtype), name=node.name))

    def alias(context, node):  # a view of the whole tensor (Llama's logits_to_keep=0)
        x = _get_inputs(context, node, min_expected=1)[0]
        context.add(mb.identity(x=x, name=node.name))

    def diff(context, node):  # torch.diff(x, dim=d, prepend=p): packed-sequence detection in causal masks
        inputs = _get_inputs(context, node, min_expected=1) + [None] * 4
        x, n, dim, prepend, append = inputs[:5]
        n, dim = (1 if n is None else int(n.val)), (-1 if dim is None else int(dim.val))
        dim %= x.rank
        parts = [v for v in (prepend, x, append) if v is not None]
        x = mb.concat(values=parts, axis=dim) if len(parts) > 1 else x
        masked = [True] * x.rank
        only = [i != dim for i in range(x.rank)]
        for step in range(n):
            zeros = [0] * x.rank
            begin = [1 if i == dim else 0 for i in range(x.rank)]
            end = [-1 if i == dim else 0 for i in range(x.rank)]
            head = mb.slice_by_index(x=x, begin=begin, end=zeros, begin_mask=only, end_mask=masked)
            tail = mb.slice_by_index(x=x, begin=zeros, end=end, begin_mask=masked, end_mask=only)
            x = mb.sub(x=head, y=tail, name=node.name if step == n - 1 else None)
        context.add(x, torch_name=node.name)

    known = _TORCH_OPS_REGISTRY.name_to_func_mapping  # what the EXIR frontend looks kinds up in
    extra = {"where.scalarother": where_scalarother, "new_ones": new_ones, "alias": alias, "diff": diff}
    extra |= {f"__{op}__": known.get(f"bitwise_{op}") for op in ("and", "or")}  # mask & mask: bool ops
    for kind, func in extra.items():
        if kind not in known and func is not None:
            _TORCH_OPS_REGISTRY.set_func_by_name(func, kind)


class _Exported(nn.Module):
    """model(**inputs) with positional tensors in, its logits (or first output) out."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        accepts = inspect.signature(model.forward).parameters
        self.options = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in accepts}

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)), **self.options)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]


def _placeholder(weight) -> nn.Parameter:
    return nn.Parameter(torch.empty(weight.layout.shape), requires_grad=False)


def load_palettized(directory: str) -> nn.Module:
    """A palettized checkpoint directory as its model class (config.json's `architectures`), in eval mode."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a folder (a palettized checkpoint saved with save_pretrained)")
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(f"{directory}/config.json names no transformers model class in 'architectures'")
    model = cls.from_pretrained(directory, variant=saved_variant(directory))
    if not palettized_modules(model):
        raise ValueError(f"{directory} is not a palettized dkm_hf checkpoint (no palettized modules after loading)")
    return model.eval()


def _check_model(model: nn.Module, example_inputs: dict[str, Any]) -> None:
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ValueError("example_inputs must be a non-empty dict of tensors, e.g. {'input_ids': ids}")
    accepts = inspect.signature(model.forward).parameters
    for key, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"example_inputs[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if key not in accepts and not any(p.kind == p.VAR_KEYWORD for p in accepts.values()):
            raise ValueError(f"example_inputs[{key!r}]: {type(model).__name__}.forward takes no {key!r}")
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("Core ML export runs on the CPU: move the model there first (model.cpu())")
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in model.parameters()):
        raise ValueError("Core ML export needs float32 parameters (model.float()); Core ML computes in fp16 anyway")


def to_coreml(model_or_dir, example_inputs: dict[str, torch.Tensor], path, minimum_deployment_target=None, **options):
    """Write `path` (.mlpackage; one already there is replaced only if it is a Core ML package or empty, a link the
    package it names): the model converted by coremltools, every palettized weight as Core ML LUT ops holding its own
    LUT, indices and scale. Returns the saved `coremltools.models.MLModel`.

    `model_or_dir`: a palettized model or a palettized checkpoint directory. `example_inputs`: the forward's tensor
    arguments, whose shapes become the model's fixed input shapes (integer tensors are int32 in Core ML).
    `minimum_deployment_target`: a `coremltools.target` or its name; default iOS18 (every layout). The model's
    `logits` (or first output) is the output "logits". The package's user_defined_metadata[METADATA_KEY] maps
    each clustered module to its constexpr_lut_to_dense op (a per-channel scale op reads that op's output).
    `options` go to `coremltools.convert` (e.g. compute_precision=ct.precision.FLOAT32 keeps float32 / bfloat16
    LUTs exact; the default fp16 precision stores every LUT as fp16, with a warning for wider ones)."""
    ct, out = _coremltools(), Path(path).resolve()
    if Path(path).suffix != ".mlpackage":
        raise ValueError(f"{path}: Core ML programs are saved as an .mlpackage directory (name it *.mlpackage)")
    if out.exists() and not ((out / "Manifest.json").is_file() or (out.is_dir() and not any(out.iterdir()))):
        raise ValueError(f"{path} exists and is not a Core ML package: refusing to replace it")
    target = coreml_target(minimum_deployment_target)
    model = load_palettized(str(model_or_dir)) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    weights = coreml_weights(model, target)
    wide = [n for n, w in weights.items() if w.lut.dtype != np.float16]
    if wide and options.get("compute_precision", ct.precision.FLOAT16) != ct.precision.FLOAT32:
        warnings.warn(
            f"{len(wide)} palettized module(s) ({wide[0]}, ...) have float32 / bfloat16 LUTs: Core ML's fp16 compute "
            "precision stores them as fp16; pass compute_precision=coremltools.precision.FLOAT32 to keep them exact",
            stacklevel=2,
        )
    _check_model(model, example_inputs)
    _register_missing_torch_ops()
    names = list(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with plain_modules(model, _placeholder), torch.no_grad():
            exported = torch.export.export(_Exported(model, names), tuple(example_inputs[n] for n in names))
            exported = exported.run_decompositions({})
    finally:
        model.train(was_training)
    ids = dict.fromkeys(id(weight) for weight in weights.values())  # tied modules share one weight
    number = {i: token for token, i in enumerate(ids)}  # id of a weight -> its token
    by_arg = {}
    for arg, param in exported.graph_signature.inputs_to_parameters.items():
        module, _, name = param.removeprefix("model.").rpartition(".")
        clustered = weight_name(module, name)
        if clustered in weights:
            by_arg[arg] = (number[id(weights[clustered])], weights[clustered])
    inputs = [
        ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.float32 if t.is_floating_point() else np.int32)
        for n, t in example_inputs.items()
    ]
    with _weights_as_lut_ops(by_arg):
        mlmodel = ct.convert(
            exported,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits")],
            convert_to="mlprogram",
            minimum_deployment_target=target,
            **options,
        )
    op_of = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        found = re.search(r"_dkm_hf(\d+)(?:_|$)", op.name)
        if op.op_type == "constexpr_lut_to_dense" and found:
            op_of[int(found.group(1))] = op.name
    mapping = {name: op_of[number[id(w)]] for name, w in weights.items() if number[id(w)] in op_of}
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(mapping, sort_keys=True)
    staged = out.with_name(f".{out.stem}.{os.getpid()}.mlpackage")  # the old package stays until the new is whole
    try:
        mlmodel.save(str(staged))
        shutil.rmtree(out, ignore_errors=True)  # as coremltools' own save deletes it
        os.replace(staged, out)
    finally:  # left only by a failure
        shutil.rmtree(staged, ignore_errors=True)
    return mlmodel
