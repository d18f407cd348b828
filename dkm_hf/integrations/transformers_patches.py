"""Everything dkm_hf changes in transformers or relies on beyond its public hooks, in one place.

The public hooks (HfQuantizer's methods, `register_quantization_config` / `register_quantizer`, `add_model_tags`)
cover most of the integration; what they do not cover is below, each with the reason. tests/integrations/
test_transformers_patches.py checks every assumption and fails naming the patch when a transformers release changes
what it relies on.

1. `from_pretrained(..., dkm_config=, dkm_inference_mode=)`: transformers passes keyword arguments it does not know to
   the model's __init__, which fails; the wrapper of `PreTrainedModel.from_pretrained` takes them off first. For a
   local dkm_hf checkpoint it also checks the shard index and headers before transformers parses them.
2. `save_pretrained` (no hook covers the whole save, so it is wrapped): a save of a DKM or palettized model is atomic
   (see `saving`), a palettized one writes a model card; any other save that writes shards over a single-file
   checkpoint removes that file (transformers' clean-up only knows shard names; loading reads the single file first).
   transformers replaces a quantized model's `state_dict=` argument by what the quantizer's hook returns: the wrapper
   hands it over in a context variable, and one model's saves take turns (each records its id in the model's config).
3. `push_to_hub`'s card: transformers writes its placeholder README.md after `save_pretrained`, just before the
   upload; its private `_upload_modified_files` is the last point where dkm_hf's card can replace it.
4. `untie`: palettized tied modules share LUT buffers, not a `weight` parameter; loading would look the parameter up
   (`mark_tied_weights_as_initialized`, `tie_weights`) through the model's `all_tied_weights_keys`.
5. `mark_initialized`: palettized weights are filled by the checkpoint; while it loads, each reads as an empty meta
   tensor carrying transformers' private `_is_hf_initialized` flag, so `_init_weights` neither decodes uninitialised
   buffers nor writes to a temporary (the module itself is initialised as usual: its non-persistent buffers, such as
   a scaled embedding's `embed_scale`, get their values).
6. `register`: registering a quantization method twice raises; `importlib.reload(dkm_hf)` re-registers by replacing
   the entries of transformers' AUTO_QUANTIZATION_CONFIG_MAPPING / AUTO_QUANTIZER_MAPPING.
7. `.half()` / `.float()`: transformers refuses them on every quantized model; DKM and palettized models cast safely
   (centroids and LUTs keep their dtype, the compute dtype follows), as `.to(dtype)` and `.bfloat16()` already do.
8. `checkpoint_initial_model` (resume.py): Trainer's best-model tracking only sees evaluations it runs after a step;
   the step-0 evaluation (`eval_on_start`) of the hard model, which is post-training k-means, is made a candidate
   through the Trainer's private `_determine_best_metric`, `_save_checkpoint` and `_get_output_dir`.
9. `accumulated_batch_share`: when the model's forward takes `**kwargs`, Trainer counts the labelled items of the whole
   accumulated batch (`num_items_in_batch`) and no longer divides the loss by the accumulation steps, trusting the
   model to have divided by that count. Models whose loss is a plain batch mean (BERT's sequence classification) and
   DKMTrainer's distillation loss do not; their batch mean is turned into the micro-batch's share of the whole here,
   counting items by Trainer's own rule (its private `_loss_shifts_labels`: causal LMs count `labels[..., 1:]`) and
   scaled by the number of processes as Trainer's `compute_loss` scales it.
10. `num_parameters()` / `get_memory_footprint()`: a palettized weight is no parameter but a LUT and packed indices
    (buffers), and a decoded weight kept in dense mode is neither; without the patch a palettized model reports
    neither its weights nor the memory they hold. `num_parameters()` counts every palettized weight's elements (as
    frozen parameters: not with `only_trainable=True`), `get_memory_footprint()` adds the decoded weights it keeps;
    `dtype` / `device` of a model whose every float parameter is palettized come from its palettized weights.
11. `tie_weights()`: called on its own (by users, `resize_token_embeddings`, accelerate) it rebuilds the tie map from
    the config and sets each tied target to its source parameter; palettized weights are no parameters (their tie is
    the shared LUT and indices already), so they are left out of the map, as loading leaves them out (4).
12. `resize_token_embeddings`: the LUTs, indices and centroids of a clustered embedding or head are laid out for its
    rows; transformers would replace the module by a plain one (a clustered head) or copy into a temporary (a
    palettized embedding). It is refused, naming the modules, before anything changes.
13. `CallbackHandler.on_log`: Trainer lists the reporting integrations (TensorBoard, W&B, ...) before the callbacks a
    user passes, and each consumes the log as it comes; a `DKMCallback` given to a plain `Trainer` would add its
    metrics after they have gone. Every callback with a `_dkm_merge_logs` method adds its metrics first.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.trainer_callback import CallbackHandler

from ..config import DKMConfig
from ..nn.dkm import DKMMixin, dkm_modules
from ..nn.palettized import MODES, PalettizedMixin, palettized_modules
from ..nn.weights import parameter_keys, save_lock
from ..surgery.model import get_dkm_config, set_inference_mode, untie_declined
from ..surgery.select import check_ties
from .model_card import write_model_card
from .preflight import cached_snapshot, preflight
from .saving import atomic_save, stale_single_file_guard

_MARK = "_dkm_hf_patched"
# from_pretrained's options and save_pretrained's `state_dict=` that transformers keeps from the quantizer's hooks
LOAD_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("dkm_hf_load_options", default={})
SAVE_STATE_DICT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dkm_hf_save_state_dict", default=None)


def register(config_cls: type, quantizer_cls: type) -> None:
    """(6) Register the "dkm" quantization method with transformers."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("dkm") is not config_cls:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop("dkm", None)
        register_quantization_config("dkm")(config_cls)
    if AUTO_QUANTIZER_MAPPING.get("dkm") is not quantizer_cls:
        AUTO_QUANTIZER_MAPPING.pop("dkm", None)
        register_quantizer("dkm")(quantizer_cls)


def untie(model: nn.Module, keys: list[str]) -> None:
    """(4) Drop these parameters (palettized, tied: `module.param`) from transformers' tie map."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if declared:
        for key in keys:
            declared.pop(key, None)


def mark_initialized(tensor: torch.Tensor) -> torch.Tensor:
    """(5) Tell transformers' weight initialisation to leave `tensor` alone."""
    tensor._is_hf_initialized = True
    return tensor


def counted_labels(trainer, inputs: dict) -> tuple[torch.Tensor, bool]:
    """(9) The labels of `inputs` that Trainer counts into `num_items_in_batch` (those != -100), and whether they are
    shifted: a causal LM's `labels[..., 1:]` (or `shift_labels`) are the targets of its logits `[:, :-1]`."""
    if "shift_labels" in inputs:
        return inputs["shift_labels"], True
    if trainer._loss_shifts_labels:
        return inputs["labels"][..., 1:], True
    return inputs["labels"], False


def accumulated_batch_share(trainer, items: torch.Tensor, num_items_in_batch: torch.Tensor | int) -> torch.Tensor:
    """(9) The factor that turns a micro-batch's mean loss over its `items` counted labels into the loss Trainer
    expects when it has counted `num_items_in_batch` over the optimizer step: the micro-batch's share of the items,
    times the processes that count was summed over (DDP averages their gradients), as Trainer's compute_loss scales."""
    share = items / torch.as_tensor(num_items_in_batch, device=items.device)
    if trainer.args.average_tokens_across_devices:
        share = share * (trainer.accelerator.num_processes // trainer.get_tp_size())
    return share


def is_palettized(model: nn.Module) -> bool:
    return bool(palettized_modules(model)) and not dkm_modules(model)


def _patch_from_pretrained() -> None:
    """(1)"""
    original = PreTrainedModel.from_pretrained
    if getattr(original, _MARK, False):
        return
    original_func = original.__func__

    @functools.wraps(original_func)
    def from_pretrained(cls, *args, dkm_config: DKMConfig | None = None, dkm_inference_mode: str | None = None, **kw):
        if dkm_config is not None:
            if kw.get("quantization_config") is not None:
                raise ValueError(
                    "pass the DKM configuration once: as `dkm_config=` or as `quantization_config=`, not both"
                )
            if not isinstance(dkm_config, DKMConfig):
                raise TypeError(f"dkm_config must be a dkm_hf.DKMConfig, got {type(dkm_config).__name__}")
            kw["quantization_config"] = dkm_config
        if dkm_inference_mode is not None and dkm_inference_mode not in MODES:
            raise ValueError(f"dkm_inference_mode must be one of {list(MODES)}, got {dkm_inference_mode!r}")
        path = args[0] if args else kw.get("pretrained_model_name_or_path")
        if isinstance(path, (str, os.PathLike)) and not os.path.isdir(path):  # a Hub repo: its cached download
            where = (kw.get("subfolder") or "", kw.get("cache_dir"), kw.get("revision"), kw.get("variant"))
            path = cached_snapshot(os.fspath(path), *where)
        if path is not None and os.path.isdir(path):
            preflight(path, kw.get("subfolder") or "", kw.get("variant"), kw.get("config"))
        token = LOAD_OPTIONS.set(
            {k: kw.get(k) for k in ("key_mapping", "ignore_mismatched_sizes", "quantization_config")}
        )
        try:
            result = original_func(cls, *args, **kw)
        finally:
            LOAD_OPTIONS.reset(token)
        if dkm_inference_mode is not None:
            set_inference_mode(result[0] if isinstance(result, tuple) else result, dkm_inference_mode)
        return result

    setattr(from_pretrained, _MARK, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _patch_save_pretrained() -> None:
    """(2)"""
    original = PreTrainedModel.save_pretrained
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        given = signature.bind_partial(self, save_directory, *args, **kwargs).arguments
        with save_lock(self):  # one save of a model at a time; `state_dict=` (Trainer's FSDP path) for the hook
            token = SAVE_STATE_DICT.set(given.get("state_dict"))
            try:
                return save(self, save_directory, *args, **kwargs)
            finally:
                SAVE_STATE_DICT.reset(token)

    def save(self, save_directory, *args, **kwargs):
        quantizer = getattr(self, "hf_quantizer", None)
        if "save_original_format" in signature.parameters and (dkm_modules(self) or palettized_modules(self)):
            # LUTs, packed indices and centroids have no "original format": transformers' reverse key conversion
            # would rename (or split, for stacked experts) them apart from config.json's records. dkm_hf checkpoints
            # keep the model's own parameter names, which transformers loads as they are.
            kwargs["save_original_format"] = False
        is_main = kwargs.get("is_main_process", args[0] if args else True)
        palettized = is_palettized(self)  # (transformers' add_adapter: its adapters alone are saved, as peft's)
        ours = (palettized or bool(dkm_modules(self))) and not getattr(self, "_hf_peft_config_loaded", False)
        declared = getattr(self.config, "quantization_config", None)
        declared = declared.to_dict() if isinstance(declared, DKMConfig) else declared
        if not ours and isinstance(declared, dict) and declared.get("quant_method") == "dkm" and not quantizer:
            # no DKM or palettized weight (from_config on a dkm_hf config, the base model of a model clustered in its
            # head only): it saves as the dense model it is, not under a config that declares dkm_hf files
            config, self.config = self.config, copy.copy(self.config)
            del self.config.quantization_config
            try:
                return save_pretrained(self, save_directory, *args, **kwargs)
            finally:
                self.config = config
        if not ours or os.path.isfile(save_directory) or not self.should_save_on_this_rank(is_main):
            remove_stale = stale_single_file_guard(save_directory, kwargs.get("variant"))
            result = original(self, save_directory, *args, **kwargs)
            if self.should_save_on_this_rank(is_main):
                remove_stale()
            return result

        def finish(tmp: str) -> None:
            write_model_card(self, tmp, repo=os.fspath(save_directory))

        if kwargs.get("push_to_hub"):
            # transformers names the repo after the directory; the card is written before the upload (3)
            kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            finish = None
        if not palettized:
            finish = None  # a training checkpoint: atomic as well, with transformers' own card (if any)
        write = lambda tmp: original(self, tmp, *args, **kwargs)  # noqa: E731
        return atomic_save(save_directory, write, finish, variant=kwargs.get("variant"))

    setattr(save_pretrained, _MARK, True)
    PreTrainedModel.save_pretrained = save_pretrained


def _patch_upload() -> None:
    """(3)"""
    upload = PreTrainedModel._upload_modified_files
    if getattr(upload, _MARK, False):
        return

    @functools.wraps(upload)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        if is_palettized(self):
            write_model_card(self, working_dir, repo=repo_id, replace_generated=True)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    setattr(_upload_modified_files, _MARK, True)
    PreTrainedModel._upload_modified_files = _upload_modified_files


def _patch_casts() -> None:
    """(7)"""
    for name in ("half", "float"):
        original = getattr(PreTrainedModel, name)
        if getattr(original, _MARK, False):
            continue

        def cast(self, *args, _name=name, _original=original):
            if get_dkm_config(self) is not None:
                return getattr(nn.Module, _name)(self, *args)
            return _original(self, *args)

        cast = functools.wraps(original)(cast)
        setattr(cast, _MARK, True)
        setattr(PreTrainedModel, name, cast)


def _patch_accounting() -> None:
    """(10)"""
    num_parameters, footprint = PreTrainedModel.num_parameters, PreTrainedModel.get_memory_footprint
    if getattr(num_parameters, _MARK, False):
        return

    @functools.wraps(num_parameters)
    def counted(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        total = num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if not only_trainable:
            for _, weight in palettized_modules(self):
                if weight.tied_source is None and not (
                    exclude_embeddings and isinstance(weight.module, nn.Embedding) and weight.param == "weight"
                ):
                    total += weight.layout.numel
        return total

    @functools.wraps(footprint)
    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        kept = (w._dense[1] for _, w in palettized_modules(self) if w._dense is not None)
        decoded = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}  # a tie's is a view
        return footprint(self, return_buffers) + sum(decoded.values())

    dtype, device = PreTrainedModel.dtype.fget, PreTrainedModel.device.fget

    def palettized_dtype(self) -> torch.dtype:
        try:
            return dtype(self)
        except StopIteration:  # every float parameter palettized (a model whose norms have no parameters)
            weights = palettized_modules(self)
            if not weights:
                raise
            return weights[0][1].compute_dtype

    def palettized_device(self) -> torch.device:
        try:
            return device(self)
        except StopIteration:
            return next(buffer.device for buffer in self.buffers())

    for function in (counted, get_memory_footprint, palettized_dtype, palettized_device):
        setattr(function, _MARK, True)
    PreTrainedModel.num_parameters = counted
    PreTrainedModel.get_memory_footprint = get_memory_footprint
    PreTrainedModel.dtype = property(functools.wraps(dtype)(palettized_dtype))
    PreTrainedModel.device = property(functools.wraps(device)(palettized_device))


def _patch_ties_and_resizing() -> None:
    """(11), (12)"""
    tie, resize = PreTrainedModel.tie_weights, PreTrainedModel.resize_token_embeddings
    if getattr(tie, _MARK, False):
        return

    @functools.wraps(tie)
    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        clustered = set(parameter_keys(self, "dkm_weights"))
        palettized = set(parameter_keys(self, "palettized_weights"))
        if not (clustered or palettized):
            return tie(self, missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        clustered |= palettized  # the parameters themselves (a clustered Linear's bias is not)
        mapping = self.all_tied_weights_keys
        if recompute_mapping:
            try:  # a pattern (a tied bias: BERT's MLM head) is matched against names that palettized buffers change
                mapping = self.get_expanded_tied_weights_keys(all_submodels=True)
            except ValueError:
                pass  # the map loading or an earlier call kept
        # palettized ties are the shared LUT and indices already; a side dequantized alone
        # (`dkm_hf.dequantize(model.lm_head)`) holds its own copy: no longer tied
        self.all_tied_weights_keys = {
            t: s
            for t, s in mapping.items()
            if t not in palettized and s not in palettized and (t in clustered) == (s in clustered)
        }
        tied = tie(self, missing_keys=missing_keys, recompute_mapping=False)
        if missing_keys is not None:  # from_pretrained: the pairs transformers left untied stay so
            untie_declined(self)
        check_ties(dkm_modules(self) + palettized_modules(self))  # a tie that a replaced or untied side broke
        return tied

    @functools.wraps(resize)
    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, *args, **kwargs):
        rows = getattr(self.get_input_embeddings(), "num_embeddings", None)
        target = rows if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of and target is not None:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if target == rows:  # nothing is resized (`resize_token_embeddings(len(tokenizer))` at the same size)
            return resize(self, new_num_tokens, pad_to_multiple_of, *args, **kwargs)
        embeddings = (self.get_input_embeddings(), self.get_output_embeddings())
        clustered = [
            name
            for name, module in self.named_modules()
            if isinstance(module, (DKMMixin, PalettizedMixin)) and module in embeddings
        ]
        if clustered:
            raise ValueError(
                f"resize_token_embeddings: {', '.join(clustered)} hold DKM-clustered or palettized weights, whose "
                "centroids / LUTs and indices are laid out for their rows; resize the dense model before loading it "
                "with dkm_config= (or dkm_hf.prepare), or dkm_hf.dequantize() this one first"
            )
        return resize(self, new_num_tokens, pad_to_multiple_of, *args, **kwargs)

    for function in (tie_weights, resize_token_embeddings):
        setattr(function, _MARK, True)
    PreTrainedModel.tie_weights = tie_weights
    PreTrainedModel.resize_token_embeddings = resize_token_embeddings


def _patch_log_order() -> None:
    """(13)"""
    original = CallbackHandler.on_log
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def on_log(self, args, state, control, logs, **kwargs):
        for merge in filter(None, (getattr(callback, "_dkm_merge_logs", None) for callback in self.callbacks)):
            merge(logs)
        return original(self, args, state, control, logs, **kwargs)

    setattr(on_log, _MARK, True)
    CallbackHandler.on_log = on_log


def install(config_cls: type, quantizer_cls: type) -> None:
    """Apply every patch (idempotent: importing or reloading dkm_hf twice patches once)."""
    register(config_cls, quantizer_cls)
    _patch_from_pretrained()
    _patch_save_pretrained()
    _patch_upload()
    _patch_casts()
    _patch_accounting()
    _patch_ties_and_resizing()
    _patch_log_order()
