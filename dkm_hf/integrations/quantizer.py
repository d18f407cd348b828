"""`DKMHfQuantizer`: transformers' HfQuantizer hooks for DKM, and the transformers-aware `prepare` / `dequantize`.

Hook order in `from_pretrained`: validate_environment -> _process_model_before_weight_loading (model on the meta
device: check the files' headers, swap in DKM or empty palettized modules so state-dict keys match) -> weights load
-> _process_model_after_weight_loading (check the loaded values; k-means initialisation for a dense checkpoint).
On `save_pretrained`, `get_state_dict_and_metadata` runs before config.json and the weights are written: it checks
the values (a checkpoint its loader would refuse is not saved) and records what the model's modules now are
(training or palettized checkpoint) and a fresh save id in the config and in every file's metadata.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from ..config import DKMConfig
from ..errors import PalettizedCheckpointError
from ..nn.dkm import dkm_modules
from ..nn.layout import LUT_DTYPES, layouts_from_records
from ..nn.palettized import KEPT_DTYPE_KINDS, PalettizedWeight, palettized_modules
from ..nn.weights import is_sharded, is_transposed, split_name
from ..surgery import model as surgery
from ..surgery.convert import kmeans_all, to_dkm, to_shells, weight_layouts
from ..surgery.select import check_clusterable, fp32_patterns, tied_pairs
from .checkpoint_checks import (
    carries_training_state,
    check_format,
    check_loaded,
    check_palettized_headers,
    check_save_id,
    find_tensor,
    new_save_id,
    save_metadata,
    state_key,
)
from .distributed import full_state_dict
from .model_card import TAGS
from .peft_patches import adapter_layers
from .safetensors_files import SafetensorsHeader, check_inside, read_headers
from .transformers_patches import LOAD_OPTIONS, SAVE_STATE_DICT, mark_initialized, untie

logger = logging.get_logger(__name__)


class DKMHfQuantizer(HfQuantizer):
    """Swaps modules for DKM modules (training) or palettized modules (loading a compressed checkpoint)."""

    requires_calibration = False

    def __init__(self, quantization_config: DKMConfig, **kwargs):
        # A private copy: saving records the checkpoint's layout in the config, which must not leak into the caller's.
        config = copy.deepcopy(quantization_config)
        if isinstance(config, DKMConfig):
            config.post_init()  # a config changed after it was built (`config.bits = 9`) is checked before loading
        super().__init__(config, **kwargs)
        self.file_metadata: dict[str, str] = {}
        self.init_after_load = not self.pre_quantized
        self.fresh: set[str] = set()  # clustered weights a training checkpoint lacks: their centroids come after load

    def validate_environment(self, *args, **kwargs) -> None:
        if self.quantization_config.record.format == "palettized" and not self.pre_quantized:
            raise ValueError(
                "this DKMConfig describes a saved palettized checkpoint (format='palettized'); to compress a model "
                "pass a plain DKMConfig(...)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        model.add_model_tags(TAGS)
        if not self.pre_quantized:
            # a dense checkpoint: centroids (and the values' checks) come from the loaded weights
            to_dkm(model, config, with_state=False, loaded=False)
            return model
        options = LOAD_OPTIONS.get()  # from_pretrained's, which transformers does not pass to this hook
        mismatched, given = bool(options.get("ignore_mismatched_sizes")), options.get("quantization_config")
        if (
            config.record.format == "palettized"
            and isinstance(given, DKMConfig)
            and given.record.format != "palettized"
        ):
            raise ValueError(
                "this checkpoint is already palettized (LUTs and packed indices): a DKMConfig cannot cluster it again "
                "(load it without one, turn it dense with dkm_hf.dequantize(model) and prepare it with "
                "dkm_hf.prepare(model, DKMConfig(...)))"
            )
        training = config.record.format == "train" and isinstance(given, DKMConfig)
        if training and (changed := config.differing_settings(given)):
            raise ValueError(
                f"this checkpoint was saved by a DKM model whose DKMConfig differs from the one given in "
                f"{', '.join(changed)}, and transformers would keep the checkpoint's: load it without a config to go "
                "on at its settings, or for new ones turn it dense (dkm_hf.dequantize(model)) and prepare it again "
                "(dkm_hf.prepare(model, DKMConfig(...)))"
            )
        if options.get("key_mapping"):
            raise ValueError(
                "key_mapping= does not apply to a dkm_hf checkpoint: its tensors carry the saving model's own names, "
                "which config.json's quantization_config records; load it without key_mapping"
            )
        header = self._read_files(model, list(checkpoint_files or []))
        header.tensors.prefix = getattr(model, "base_model_prefix", "") or ""  # this model's names, not any suffix
        check_save_id(header, config.record)
        check_format(header, config.record)
        self.file_metadata = header.metadata
        if config.record.format == "palettized":
            names = _model_names(model, config.record.modules)
            records, left_out = _kept_records(model, config.record.modules, names)
            stored = layouts_from_records(records, lambda name: _transposed(model, names.get(name)))
            check_palettized_headers(header, stored, config.lut_dtype, model, mismatched, left_out)
            layouts = {
                names[n]: replace(lay, tied_to=names.get(lay.tied_to)) if lay.tied_to else lay
                for n, lay in stored.items()
                if n in names and (lay.tied_to is None or lay.tied_to in names)
            }
            pairs = tied_pairs(model)
            for target, source in pairs.items():
                # a head the saving model did not have (a base model's checkpoint), tied here to a palettized
                # embedding: it shares that embedding, as transformers ties it for a dense checkpoint
                if (
                    source in layouts
                    and target not in layouts
                    and header.tensors.find(_param_key(model, target)) is None
                ):
                    layouts[target] = replace(layouts[source], transposed=_transposed(model, target), tied_to=source)
            # out of transformers' tie map: the tied palettized targets, and the declared targets stored untied
            tied = [_param_key(model, n) for n, lay in layouts.items() if lay.tied_to or pairs.get(n) in layouts]
            for name, weight in to_shells(model, layouts, LUT_DTYPES[config.lut_dtype]).items():
                weight.placeholder = mark_initialized(torch.empty(weight.layout.shape, device="meta"))
                if _kept_in_fp32(model, _param_key(model, name), weight.compute_dtype):
                    weight.compute_dtype = torch.float32  # decoded as transformers loads the dense weight
            untie(model, tied)
            return model
        # a declared tie whose target the checkpoint stores with centroids of its own (T5 v1.1's head) stays untied
        tensors = header.tensors
        untied = [t for t in tied_pairs(model) if find_tensor(tensors, state_key(tensors, t, "centroids")) is not None]
        weights = to_dkm(model, config, with_state=True, untied=untied, loaded=False)
        # weights the checkpoint does not hold (a head class's new layer), or of another shape that transformers
        # re-initialises (ignore_mismatched_sizes): their centroids come from the weights after loading
        entries = {n: header.tensors.find(_param_key(model, n)) for n, w in weights.items() if w.tied_source is None}
        self.fresh = {
            n for n, e in entries.items() if e is None or (mismatched and tuple(e.shape) != weights[n].layout.shape)
        }
        layouts = weight_layouts((n, w) for n, w in weights.items() if n not in self.fresh)
        in_model = lambda name: _in_model(model, name) and name not in self.fresh  # noqa: E731
        self.init_after_load = not carries_training_state(header, layouts, in_model)
        for name, weight in weights.items():
            if self.init_after_load or name in self.fresh:  # all: a dense checkpoint whose config.json declares DKM
                weight.drop_state()
        return model

    def _read_files(self, model, files: list[str]) -> SafetensorsHeader:
        if self.quantization_config.record.format == "palettized":
            if not files:
                raise PalettizedCheckpointError(
                    "a palettized checkpoint loads from its saved directory, whose safetensors headers dkm_hf checks "
                    "before reading a weight; this load has no weight files (from_pretrained(None, config=..., "
                    "state_dict=...)). Save the model with save_pretrained and load that directory, or load the "
                    "state dict into a palettized model: model = from_pretrained(directory); "
                    "model.load_state_dict(state_dict)"
                )
            for path in files:
                if not path.endswith(".safetensors"):
                    raise PalettizedCheckpointError(
                        f"{os.path.basename(path)}: palettized checkpoints load from safetensors only; dkm_hf never "
                        "unpickles (.bin / pickle) weight files. Re-save the model with save_pretrained."
                    )
        files = [f for f in files if f.endswith(".safetensors")]
        if not files:
            return SafetensorsHeader({}, {})
        source = getattr(model.config, "name_or_path", "")
        check_inside(source if os.path.isdir(source) else os.path.dirname(files[0]), files)
        return read_headers(files)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if dkm_modules(model) and "disk" in (getattr(model, "hf_device_map", None) or {}).values():
            raise ValueError(
                "a DKM model cannot have weights offloaded to disk (device_map placed modules on 'disk'): its "
                "forward computes clustered weights from every layer's parameters; give max_memory room for the "
                "model or load it on one device (a palettized checkpoint can be offloaded)"
            )
        for _, weight in palettized_modules(model):
            weight.placeholder = None
            _undo_upcast(weight, LUT_DTYPES[self.quantization_config.lut_dtype])
        check_loaded(model, self.file_metadata, getattr(model, "base_model_prefix", "") or "")
        if self.init_after_load:
            kmeans_all(model)
        else:
            for name, weight in dkm_modules(model):
                if name in self.fresh or weight.__dict__.pop("untied_at_load", False):
                    check_clusterable(name, weight.weight, weight.settings.lut_torch_dtype)
                    weight.init_centroids()
                else:
                    weight.dkm_ready = True
        return model

    def get_state_dict_and_metadata(self, model):
        adapters = adapter_layers(model)
        if adapters and not getattr(model, "_hf_peft_config_loaded", False):  # transformers' add_adapter saves them
            # alone; here their base layers would be stored as `<name>.base_layer`, which the model's class lacks
            raise ValueError(
                f"the model holds peft adapter layers ({adapters[0]}{' and more' if len(adapters) > 1 else ''}): save "
                "the adapters with peft_model.save_pretrained and the model without them, peft_model.unload() (a copy "
                "of it: copy.deepcopy(peft_model).unload()), or merge into a dequantized model first"
            )
        record = replace(surgery.record_of(model), save_id=new_save_id())
        self.quantization_config.record = record  # config.json is written after this hook
        config = surgery.get_dkm_config(model)
        if config is not None:
            config.record = record
        state_dict = SAVE_STATE_DICT.get()  # `save_pretrained(state_dict=...)`'s
        if state_dict is None and is_sharded(model):
            # FSDP2: the modules' own state dicts hold shards; save the gathered one (every rank calls save_pretrained)
            state_dict = full_state_dict(model)
        # an empty dict is what FSDP2's gathering gives the ranks that write nothing
        given = state_dict if record.format == "palettized" and state_dict else None
        return state_dict, save_metadata(model, record, given)

    def dequantize(self, model, dtype=None):
        """`model.dequantize(dtype=None)`: the dense model, cast to `dtype` where one is given (without it the dense
        weights are in the dtype the model computes in, that of a later `.to(dtype)` too)."""
        model = super().dequantize(model)  # transformers' default dtype (the one the model was loaded in): not applied
        return model if dtype is None else model.to(dtype)

    def _dequantize(self, model, dtype=None):
        return surgery.dequantize(model)  # the dense modules, and no DKMConfig left on the model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    # True for palettized models too, so a Trainer can evaluate them; their LUTs and indices are buffers, so
    # training one only updates its float parameters (biases, norms, unclustered layers).
    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _model_names(model: nn.Module, records: dict) -> dict[str, str]:
    """{recorded weight name: the name of that weight in `model`}. A checkpoint of a model with a head loads into its
    base model and the other way round (as transformers maps their keys through `base_model_prefix`), and into
    another head class of the same base model: a name is kept, or its prefix dropped or added. A recorded weight the
    model does not have (a head's, loading into the base model or another head; a pooler that `add_pooling_layer=False`
    leaves out; a layer another head class replaces with `Identity`) is left out: its tensors are then unexpected
    keys, which transformers reports, as for a dense checkpoint."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = bool(prefix) and hasattr(model, prefix)
    names = {}
    for name in records if isinstance(records, dict) else ():
        found = next((c for c in _candidates(prefix, has_base, name) if _resolves(model, c)), None)
        if found is not None:
            names[name] = found
    return names


def _kept_records(model: nn.Module, records, names: dict[str, str]) -> tuple:
    """(the records of the weights `model` has (`_model_names`), a tie kept with its source; the names of the others,
    whose tensors stay unexpected keys). A record of a weight the base model lacks (not a head's) is warned about by
    name: a renamed layer would otherwise load only as missing and unexpected keys. Records that are not a dict are
    returned as they are, for `layouts_from_records` to refuse."""
    if not isinstance(records, dict):
        return records, ()
    prefix = getattr(model, "base_model_prefix", "") or ""

    def dropped_source(record) -> bool:  # a tie to a recorded module the model does not have (malformed ties: kept)
        source = record.get("tied_to") if isinstance(record, dict) else None
        return isinstance(source, str) and source in records and source not in names

    kept = {n: r for n, r in records.items() if n in names and not dropped_source(r)}
    left_out = tuple(n for n in records if n not in kept)
    lacking = [n for n in left_out if not prefix or n.startswith(prefix + ".")]
    if lacking:
        logger.warning(
            f"dkm_hf: config.json's palettized module(s) {lacking[:5]} are not weights of this "
            f"{type(model).__name__}: their tensors are not loaded (a layer this model leaves out, as a pooler with "
            "add_pooling_layer=False; if the model names it otherwise, its weight stays as initialised)"
        )
    return kept, left_out


def _candidates(prefix: str, has_base: bool, name: str) -> list[str]:
    """The names a checkpoint's weight `name` may have in a model: itself, without the base prefix, or with it."""
    if prefix and name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1 :]]
    return [name, f"{prefix}.{name}"] if prefix and has_base else [name]


def _in_model(model: nn.Module, name: str) -> bool:
    """Whether weight `name` of a checkpoint (with or without the model's base prefix) is a weight of `model`."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_base = bool(prefix) and hasattr(model, prefix)
    return any(_resolves(model, c) for c in _candidates(prefix, has_base, name))


def _resolves(model: nn.Module, name: str) -> bool:
    try:
        module_name, param = split_name(model, name)
    except AttributeError:
        return False
    return param in model.get_submodule(module_name)._parameters


def _transposed(model: nn.Module, name: str | None) -> bool:
    if name is None:
        return False
    try:
        module_name, param = split_name(model, name)
    except AttributeError:
        return False  # reported by to_shells, naming the weight
    return is_transposed(model.get_submodule(module_name), param)


def _param_key(model: nn.Module, name: str) -> str:
    """The state-dict key of weight `name`'s parameter (`module.param`)."""
    try:
        module_name, param = split_name(model, name)
    except AttributeError:
        return f"{name}.weight"
    return f"{module_name}.{param}" if module_name else param


def prepare(model: nn.Module, config: DKMConfig, init: bool = True) -> nn.Module:
    """Swap the target modules of any torch model for DKM modules (in place) and initialise their centroids.

    The same replacement `from_pretrained(..., dkm_config=config)` does; use it for models built in code. A
    transformers model also gets the quantizer, so `save_pretrained` and `from_pretrained` know it.
    """
    surgery.prepare(model, config, init)
    if isinstance(model, PreTrainedModel):
        # its own config object: one built in code may be shared with other models (a teacher) that stay dense
        shared, model.config = model.config, copy.copy(model.config)
        for module in model.modules():
            if getattr(module, "config", None) is shared:
                module.config = model.config
        config = model.dkm_config
        model.hf_quantizer = DKMHfQuantizer(config, pre_quantized=False)
        model.hf_quantizer.quantization_config = config
        model.config.quantization_config = config
        model.is_quantized, model.quantization_method = True, "dkm"
        model.add_model_tags(TAGS)
    return model


def _kept_in_fp32(model: nn.Module, key: str, dtype: torch.dtype) -> bool:
    """Whether transformers loads the parameter of state-dict key `key` in float32 in a model of `dtype`: one of the
    model's `fp32_patterns` for that dtype found in the key, `*` any characters (its dtype plan's matching)."""
    return any(re.search(pattern.replace("*", ".*"), key) for pattern in fp32_patterns(model, dtype))


def _undo_upcast(weight: PalettizedWeight, lut_dtype: torch.dtype) -> None:
    """The LUT and scale of a weight `_kept_in_fp32` keep their stored dtype (transformers loads them in float32 with
    the module; the cast back is exact)."""
    for kind in KEPT_DTYPE_KINDS:
        buffer = weight.module._buffers.get(weight.buffer(kind))
        if buffer is not None and buffer.dtype != lut_dtype:
            weight.module._buffers[weight.buffer(kind)] = buffer.to(lut_dtype)


def dequantize(model: nn.Module) -> nn.Module:
    """`model` made (in place, and returned) a plain model with dense weights that saves and loads without dkm_hf
    (transformers' `model.dequantize()`).

    A wrapper with `get_base_model()` (peft's PeftModel) is decoded in place through its base model, whose quantizer
    and `quantization_config` go too: merged into, it saves as a plain dense checkpoint."""
    base = (
        model.get_base_model()
        if not isinstance(model, PreTrainedModel) and hasattr(model, "get_base_model")
        else model
    )
    if isinstance(base, PreTrainedModel) and getattr(base, "hf_quantizer", None) is not None:
        base.dequantize()  # in place: transformers drops the quantizer and the config's quantization_config
    return surgery.dequantize(model)
