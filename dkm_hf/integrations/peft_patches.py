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
refused too: the copy's palettized weights are buffers, so it would train nothing without a word; and so are
`target_parameters` that name palettized weights (stacked experts): peft matches parameters only, and skipped them.

dkm_hf itself does not import peft (an optional dependency): the patch is applied when peft's
`tuners.tuners_utils` is imported, or at once if it already is (transformers' Trainer, which dkm_hf imports, imports
peft where it is installed: then at once).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from torch import nn

from ..nn.palettized import PalettizedMixin
from ..nn.weights import parameter_keys

TARGET = "peft.tuners.tuners_utils"
_MARK = "_dkm_hf_patched"


def palettized_base_layers(model: nn.Module, tuner_layer: type) -> list[str]:
    """Names of the adapter layers (`tuner_layer` instances) of `model` whose base layer holds palettized weights."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, tuner_layer) and isinstance(module.get_base_layer(), PalettizedMixin)
    ]


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
    for name, module in list(sys.modules.items()):
        holds = getattr(module, "check_adapters_to_merge", None) is original_check
        if (name == "peft" or name.startswith("peft.")) and holds:
            module.check_adapters_to_merge = check_adapters_to_merge
    tuners_utils.check_adapters_to_merge = check_adapters_to_merge

    original_inject = base_tuner._inject_parameters

    @functools.wraps(original_inject)
    def inject_parameters(self, peft_config, model, *args, **kwargs):
        targets = list(getattr(peft_config, "target_parameters", None) or [])
        held = parameter_keys(model, "palettized_weights")
        hit = [n for n in held if any(n == t or n.endswith(f".{t}") for t in targets)]
        if hit:
            raise ValueError(
                f"target_parameters name palettized weights ({hit[0]}{' and more' if len(hit) > 1 else ''}): a "
                "palettized weight is a LUT + packed indices (buffers), not a parameter peft can adapt. Decode it "
                "first (dkm_hf.dequantize(model.<module>)) or target other weights"
            )
        return original_inject(self, peft_config, model, *args, **kwargs)

    base_tuner._inject_parameters = inject_parameters

    wrapper = sys.modules["peft.utils.other"].ModulesToSaveWrapper  # imported by tuners_utils
    original_update = wrapper.update

    @functools.wraps(original_update)
    def update(self, adapter_name, *args, **kwargs):
        held = [name or "itself" for name, m in self.original_module.named_modules() if isinstance(m, PalettizedMixin)]
        if held:
            raise ValueError(
                f"modules_to_save: a {type(self.original_module).__name__} holding palettized weights ({held[0]}) "
                "cannot be trained as a copy: its palettized weights are buffers (LUT + packed indices), not "
                "parameters. Decode that module first (dkm_hf.dequantize(model.<module>)) or leave it out"
            )
        return original_update(self, adapter_name, *args, **kwargs)

    wrapper.update = update


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies the patch once TARGET is imported: finds its spec with the other finders, wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: ModuleType) -> None:
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Patch peft now if it is imported, else when it is (idempotent)."""
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
