"""LoRA (peft) on palettized weights: what peft cannot know about a weight that is decoded on every read.

peft wraps a palettized module as it wraps any `nn.Linear` (the module keeps its class: a generated subclass), reads
its weight's dtype, shape and device through the decoding property, and trains the adapters while the palettized
weight stays buffers (LUT + packed indices), never a parameter. Merging cannot work that way: peft adds the
adapters' product into `base_layer.weight.data`, which here is a temporary decoded for the read, so the merge would be
lost without a word (and W + BA is no longer a LUT + indices anyway). peft's own hook for "this model cannot be
merged", `BaseTuner._check_merge_allowed` (run by `merge_and_unload`, `merge_adapter` and `PeftModel` merging), is
wrapped to refuse it, naming the modules and the way out: decode to dense first (`dkm_hf.dequantize`). So is the
layer-level `check_adapters_to_merge` that every tuner layer's own `merge()` runs first (a `LoraLayer.merge()` called
directly would otherwise mark the layer merged and drop its adapter from the output); peft's modules import it by
name, so it is replaced in every peft module loaded that holds it, and in tuners_utils before the others load.

`modules_to_save` (a trainable copy of a whole module, e.g. the LM head) of a module holding palettized weights is
refused for training (an adapter loaded for inference keeps its copy): the copy's palettized weights are buffers, so
it would train nothing without a word; and so are `target_parameters` that name palettized weights (stacked experts):
peft matches parameters only, and skipped them. Both are refused before the model changes.

More places where peft assumes a weight is a parameter: `unload()` of a tuner without its own replacement (IA3,
LoHa, ..., and MixedModel's) assigns the base layer's weight to itself, which a palettized module refuses (here: the
base layer is put back as it is); prompt tuning looks for the word embeddings by a parameter of the vocabulary's size
(here: the model's input embeddings when they are palettized); an adapter whose `modules_to_save` copy was trained
dense meets a palettized module at its load (here: refused by name, not a KeyError); and a layer built as
`type(base_layer)(...)` (LoRA's Conv2d adapters) is built as the base layer's own class (`weights.variant_class`).

dkm_hf itself does not import peft (an optional dependency): each patch is applied when its peft module
(`tuners.tuners_utils`, `peft_model`) is imported, or at once if it already is (transformers' Trainer, which dkm_hf
imports, imports peft where it is installed: then at once).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from torch import nn

from ..nn.palettized import KINDS, PalettizedMixin
from ..nn.weights import parameter_keys

TARGET, MODEL_TARGET = "peft.tuners.tuners_utils", "peft.peft_model"
_MARK = "_dkm_hf_patched"


def palettized_base_layers(model: nn.Module, tuner_layer: type) -> list[str]:
    """Names of the adapter layers (`tuner_layer` instances) of `model` whose base layer holds palettized weights."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, tuner_layer) and isinstance(module.get_base_layer(), PalettizedMixin)
    ]


def adapter_layers(model: nn.Module) -> list[str]:
    """Names of peft's adapter layers inside `model` (each holds the module it adapts as `base_layer`)."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.") and hasattr(m, "base_layer")]


def _refuse_untrainable(model: nn.Module, peft_config) -> None:
    """`modules_to_save` of modules holding palettized weights (to be trained) and `target_parameters` naming
    palettized weights: refused before peft changes the model."""
    targets = list(getattr(peft_config, "target_parameters", None) or [])
    held = parameter_keys(model, "palettized_weights")
    hit = [n for n in held if any(n == t or n.endswith(f".{t}") for t in targets)]
    if hit:
        raise ValueError(
            f"target_parameters name palettized weights ({hit[0]}{' and more' if len(hit) > 1 else ''}): a "
            "palettized weight is a LUT + packed indices (buffers), not a parameter peft can adapt. Decode it "
            "first (dkm_hf.dequantize(model.<module>)) or target other weights"
        )
    copies = list(getattr(peft_config, "modules_to_save", None) or [])
    if getattr(peft_config, "inference_mode", False) or not copies:
        return
    matches = sys.modules["peft.utils.other"]._is_valid_match
    for name, module in model.named_modules():
        if not any(matches(name, target) for target in copies):
            continue
        held = [n or "itself" for n, m in module.named_modules() if isinstance(m, PalettizedMixin)]
        if held:
            raise ValueError(
                f"modules_to_save: {name}, a {type(module).__name__} holding palettized weights ({held[0]}), "
                "cannot be trained as a copy: its palettized weights are buffers (LUT + packed indices), not "
                "parameters. Decode that module first (dkm_hf.dequantize(model.<module>)) or leave it out"
            )


def _refuse_merge(names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"cannot merge adapters into palettized weights ({shown}): a palettized weight is a LUT + packed "
            "indices decoded on every read, and the merged weight W + BA is neither. Decode the base model to "
            "dense weights first, dkm_hf.dequantize(peft_model), then merge"
        )


def _patch(tuners_utils: ModuleType) -> None:
    base_tuner, tuner_layer = tuners_utils.BaseTuner, tuners_utils.BaseTunerLayer
    original = base_tuner._check_merge_allowed
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def check_merge_allowed(self) -> None:
        _refuse_merge(palettized_base_layers(self.model, tuner_layer))
        original(self)

    setattr(check_merge_allowed, _MARK, True)
    base_tuner._check_merge_allowed = check_merge_allowed

    original_check = tuners_utils.check_adapters_to_merge

    @functools.wraps(original_check)
    def check_adapters_to_merge(module, adapter_names=None):
        if isinstance(module, tuner_layer) and isinstance(module.get_base_layer(), PalettizedMixin):
            _refuse_merge([f"a {type(module).__name__} adapter layer"])
        return original_check(module, adapter_names)

    setattr(check_adapters_to_merge, _MARK, True)
    _replace_in_peft("check_adapters_to_merge", original_check, check_adapters_to_merge)
    tuners_utils.check_adapters_to_merge = check_adapters_to_merge

    original_inject = base_tuner.inject_adapter

    @functools.wraps(original_inject)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        _refuse_untrainable(model, self.peft_config[adapter_name])
        return original_inject(self, model, adapter_name, *args, **kwargs)

    base_tuner.inject_adapter = inject_adapter

    other = sys.modules["peft.utils.other"]  # imported by tuners_utils; prompt learning adds its copies here only
    original_additional = other.set_additional_trainable_modules

    @functools.wraps(original_additional)
    def set_additional_trainable_modules(model, peft_config, *args, **kwargs):
        _refuse_untrainable(model, peft_config)
        return original_additional(model, peft_config, *args, **kwargs)

    _replace_in_peft("set_additional_trainable_modules", original_additional, set_additional_trainable_modules)

    _keep_base_layers(base_tuner)


def _replace_in_peft(name: str, original, replacement) -> None:
    """`replacement` for `original` in every loaded peft module that holds it as `name` (imported by name)."""
    for module_name, module in list(sys.modules.items()):
        if (module_name == "peft" or module_name.startswith("peft.")) and getattr(module, name, None) is original:
            setattr(module, name, replacement)


def _keep_base_layers(tuner: type) -> None:
    """`unload()`: a palettized base layer is put back as it is (peft assigns its weight to itself, which a palettized
    module refuses), by `tuner`'s own `_replace_module` (BaseTuner's, or a subclass's such as MixedModel's)."""
    original = tuner.__dict__.get("_replace_module")
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def replace_module(self, parent, child_name, new_module, child):
        if isinstance(new_module, PalettizedMixin) and new_module is getattr(child, "base_layer", None):
            setattr(parent, child_name, new_module)
            return
        original(self, parent, child_name, new_module, child)

    setattr(replace_module, _MARK, True)
    tuner._replace_module = replace_module


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _patch_model(peft_model: ModuleType) -> None:
    """Prompt tuning's word embeddings: found by name or by a parameter of the vocabulary's size, which a palettized
    embedding (LUT + indices: buffers) is not; then lent under the name peft looks for first."""
    model_class = peft_model.PeftModel
    original = model_class._setup_prompt_encoder
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def setup_prompt_encoder(self, adapter_name):
        base = self.base_model
        getter = getattr(base, "get_input_embeddings", None)
        embeddings = getter() if getter is not None else None
        if not isinstance(embeddings, PalettizedMixin) or hasattr(base, "embeddings"):
            return original(self, adapter_name)
        holder = nn.Module()
        holder.word_embeddings = embeddings
        base.embeddings = holder  # `embeddings.word_embeddings`, as in BERT
        try:
            return original(self, adapter_name)
        finally:
            del base.embeddings

    setattr(setup_prompt_encoder, _MARK, True)
    model_class._setup_prompt_encoder = setup_prompt_encoder

    original_load = peft_model.set_peft_model_state_dict

    @functools.wraps(original_load)
    def set_peft_model_state_dict(model, state_dict, *args, **kwargs):
        try:
            return original_load(model, state_dict, *args, **kwargs)
        except KeyError as error:  # a copy (modules_to_save) trained dense, palettized here: its LUT is looked up
            key = str(error.args[0]) if error.args else ""
            if not key.endswith(tuple(f"_{kind}" for kind in KINDS)):
                raise
            raise ValueError(
                f"the adapter holds no {key}: it was trained with a dense copy of a module (modules_to_save) that is "
                "palettized here. Decode that module on the base first (dkm_hf.dequantize(model.<module>)), as it "
                "was when the adapter was trained"
            ) from error

    _replace_in_peft("set_peft_model_state_dict", original_load, set_peft_model_state_dict)
    for tuner in _subclasses(sys.modules[TARGET].BaseTuner):  # loaded with peft.tuners (MixedModel's own, ...)
        _keep_base_layers(tuner)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies `patch` once `target` is imported: finds its spec with the other finders, wraps its loader."""

    def __init__(self, target: str, patch) -> None:
        self.target, self.patch = target, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                self.patch(module)

            spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch peft now if it is imported, else when it is (idempotent)."""
    for target, patch in ((TARGET, _patch), (MODEL_TARGET, _patch_model)):
        if target in sys.modules:
            patch(sys.modules[target])
        elif not any(isinstance(f, _AfterImport) and f.target == target for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(target, patch))
