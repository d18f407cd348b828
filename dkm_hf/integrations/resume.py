"""Which directory `DKMTrainer.train(resume_from_checkpoint=...)` may resume from.

A training checkpoint (`checkpoint-N/`, written by Trainer's `_save_checkpoint`) holds the float weights with each
layer's centroids, then the optimizer, scheduler and RNG states, and last `trainer_state.json`. It is complete when
that last file reads as a trainer state and the model's config and weight files are there: a run killed while
`checkpoint-N` was being written leaves it without them. A palettized checkpoint (what `save_model` writes at the
end) holds LUTs and packed indices instead and cannot be trained from. A peft model's checkpoint holds its adapter
(`adapter_config.json` and its weights) instead of the model's config and weights.
"""

from __future__ import annotations

import json
import os
import re

from accelerate.utils import save_fsdp_model
from torch import nn
from transformers import PreTrainedModel
from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from ..errors import PalettizedCheckpointError
from ..nn.dkm import dkm_modules
from ..surgery.convert import weight_layouts
from ..surgery.model import get_dkm_config
from .checkpoint_checks import FORMAT_KEY, carries_training_state
from .safetensors_files import checkpoint_files, read_headers

logger = logging.get_logger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# torch.distributed.checkpoint folders of an FSDP model saved with SHARDED_STATE_DICT
_FSDP_WEIGHTS = re.compile(r"^pytorch_model_fsdp_\d+$")


def checkpoint_problem(directory: str | os.PathLike, bare: bool = False) -> str | None:
    """Why `directory` is not a complete training checkpoint to resume from, or None when it is one. `bare`: the model
    may be saved as a bare state dict, without config.json (`saves_state_dict_only`)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return "it is not a directory"
    # a peft model's checkpoint holds its adapter (the base model is rebuilt by the script, as it was built); an FSDP
    # SHARDED_STATE_DICT one its weights in torch.distributed.checkpoint folders, without config.json
    adapter = os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME))
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        if not adapter and not bare and not _fsdp_sharded(directory):
            return f"it has no readable {CONFIG_NAME} (the model was not saved completely)"
        config = None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and quant.get("quant_method") == "dkm" and quant.get("format") == "palettized":
        return (
            "it is a palettized checkpoint (LUTs and packed indices, what save_model writes at the end), not a "
            f"training checkpoint ({PREFIX_CHECKPOINT_DIR}-N: float weights and centroids). To train a palettized "
            "model further, load it, turn it dense with dkm_hf.dequantize(model) and prepare it again"
        )
    try:
        with open(os.path.join(directory, TRAINER_STATE_NAME), encoding="utf-8") as f:
            state = json.load(f)
    except OSError:
        return f"it has no {TRAINER_STATE_NAME}, the file Trainer writes last (the save did not finish)"
    except ValueError as err:
        return f"its {TRAINER_STATE_NAME}, the file Trainer writes last, is cut short or damaged ({err})"
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"its {TRAINER_STATE_NAME} is not a trainer state (global_step {step!r}, not a step count)"
    if adapter:
        weights = (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
        if not any(os.path.isfile(os.path.join(directory, name)) for name in weights):
            return f"it has {ADAPTER_CONFIG_NAME} but no adapter weights ({' or '.join(weights)})"
        return None
    return _weights_problem(directory)


def _fsdp_sharded(directory: str) -> bool:
    return any(_FSDP_WEIGHTS.match(n) and os.path.isdir(os.path.join(directory, n)) for n in os.listdir(directory))


def _weights_problem(directory: str) -> str | None:
    names = os.listdir(directory)
    if _fsdp_sharded(directory):
        return None
    if SAFE_WEIGHTS_NAME in names or SAFE_WEIGHTS_INDEX_NAME in names:
        try:
            files = checkpoint_files(directory)  # each a regular file, or an error naming it
            read_headers(files)  # a file cut short (a crash before it reached the disk) fails here
        except PalettizedCheckpointError as err:
            return f"its weight files are missing or damaged ({err})"
        return None
    if WEIGHTS_NAME in names or WEIGHTS_INDEX_NAME in names:
        return None
    return f"it has no model weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME})"


def newest_complete_checkpoint(output_dir: str | os.PathLike, bare: bool = False) -> str | None:
    """The `checkpoint-N` of highest N under `output_dir` that is complete; each newer one is skipped with a warning
    that says why. None when there is none."""
    output_dir = os.fspath(output_dir)
    found = [_CHECKPOINT.match(n) for n in os.listdir(output_dir)] if os.path.isdir(output_dir) else []
    steps = sorted((int(m.group(1)), m.group(0)) for m in found if m)
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path, bare)
        if problem is None:
            return path
        logger.warning(f"dkm_hf: not resuming from {path}: {problem}; trying the previous checkpoint")
    return None


def resolve_resume(
    resume_from_checkpoint: str | os.PathLike | bool | None, output_dir: str, bare: bool = False
) -> str | None:
    """What Trainer gets as `resume_from_checkpoint`: for True, the newest complete checkpoint in `output_dir`; for a
    path, the path once it is a complete training checkpoint. Raises a ValueError that says what is wrong."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        path = newest_complete_checkpoint(output_dir, bare)
        if path is None:
            raise ValueError(
                f"resume_from_checkpoint=True: no complete training checkpoint ({PREFIX_CHECKPOINT_DIR}-N) in "
                f"{output_dir} to resume from"
            )
        return path
    problem = checkpoint_problem(resume_from_checkpoint, bare)
    if problem is not None:
        raise ValueError(f"cannot resume training from {os.fspath(resume_from_checkpoint)}: {problem}")
    return os.fspath(resume_from_checkpoint)


def model_problem(directory: str | os.PathLike, model, bare: bool = False) -> str | None:
    """Why the DKM state saved in training checkpoint `directory` does not fit `model`'s DKM weights (a DKMConfig
    other than the one it was trained with: other bits, LUT groups or per-channel scales, other weights clustered),
    or None. Loading would only warn about missing or unexpected keys and train on mismatched centroids."""
    directory = os.fspath(directory)
    names = os.listdir(directory)
    if SAFE_WEIGHTS_NAME not in names and SAFE_WEIGHTS_INDEX_NAME not in names:
        return None  # sharded FSDP or .bin weights: transformers' loading checks those
    bare = bare and CONFIG_NAME not in names  # Trainer's bare state dict (SentenceTransformerTrainer: its own)
    model = model if bare else saved_model(model)  # a bare state dict holds the model's own names
    if model is None:
        return None  # no one transformers model holds the DKM weights: the files' names are not known here
    try:
        header = read_headers(checkpoint_files(directory))
    except PalettizedCheckpointError as err:
        return f"its weight files are missing or damaged ({err})"
    header.tensors.prefix = getattr(model, "base_model_prefix", "") or ""
    if bare:  # written by Trainer from a DKM model, without dkm_hf's metadata: its DKM state must be complete
        header.metadata = {**header.metadata, FORMAT_KEY: "train"}
    try:
        carries_training_state(header, weight_layouts(dkm_modules(model)))
    except PalettizedCheckpointError as err:
        where = "" if bare else " (its config.json's quantization_config)"
        return (
            f"its DKM state does not fit this model's DKM weights ({err}). Build the model with the DKMConfig the "
            f"checkpoint was trained with{where}"
        )
    # a clustered weight the files lack would keep its starting value (transformers only reports missing keys)
    keys = [f"{n}.weight" if s.param == "weight" else n for n, s in dkm_modules(model) if s.tied_source is None]
    missing = [key for key in keys if header.tensors.find(key) is None]
    if missing:
        return f"it lacks the clustered weight(s) {missing[:3]} (the files were altered or belong to another model)"
    return None


def saved_model(model: nn.Module) -> nn.Module | None:
    """The transformers model whose own weight names a training checkpoint of `model` holds: `model`, or the one
    transformers model holding every DKM weight of a module that wraps it (a SentenceTransformer saves its
    transformer's weights under that model's names); None otherwise."""
    if isinstance(model, PreTrainedModel):
        return model
    outer = {}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(o + ".") for o in outer):
            outer[name] = module
    inner = list(outer.values())
    if len(inner) == 1 and len(dkm_modules(inner[0])) == len(dkm_modules(model)):
        return inner[0]
    return None


def saves_state_dict_only(trainer) -> bool:
    """Whether `trainer`'s checkpoints may hold its model as a bare state dict, without config.json: Trainer saves so
    a module that is neither a PreTrainedModel nor a peft model (a model built in code). A subclass may save it its
    own way (SentenceTransformerTrainer: config.json and the transformer's names); `model_problem` reads which."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return not (isinstance(model, PreTrainedModel) or hasattr(model, "peft_config"))


def wrapper_hint(model: nn.Module) -> str:
    """For a module that is no DKM model but holds one (a custom head around a DKM backbone), what to do instead."""
    inner = [name for name, m in model.named_modules() if name and get_dkm_config(m) is not None]
    if not inner:
        return ""
    return (
        f"; this {type(model).__name__} holds one ({inner[0]!r}): train it with Trainer(..., "
        "callbacks=[dkm_hf.DKMCallback()]) and save the DKM model with "
        f"dkm_hf.palettize(model.{inner[0]}).save_pretrained(path), or build the module on the dense model and "
        "prepare the whole module (dkm_hf.prepare(module, DKMConfig(...)))"
    )


def checkpoint_initial_model(trainer, metrics: dict[str, float]) -> None:
    """(8) Record the step-0 metrics for `load_best_model_at_end` and save checkpoint-0 (a training checkpoint)."""
    if trainer._determine_best_metric(metrics=metrics, trial=None):
        # No optimizer step has run: its state is empty and the scheduler's is the initial one, so they are not saved
        # (a resume from checkpoint-0 starts both afresh, as they are). Gathering FSDP2's empty optimizer state would
        # run a step with zero gradients and count it in AdamW's `step`. Under FSDP that method also writes the model
        # file Trainer loads a best model (or a resume) from: that part stays.
        trainer._save_optimizer_and_scheduler = lambda out: (
            trainer.is_fsdp_enabled
            and save_fsdp_model(
                trainer.accelerator.state.fsdp_plugin,
                trainer.accelerator,
                trainer.model,
                out,
                **get_fsdp_ckpt_kwargs(),
            )
        )
        try:
            trainer._save_checkpoint(trainer.model, trial=None)
        finally:
            del trainer._save_optimizer_and_scheduler
        # `_save_checkpoint` takes best_global_step == 0 for "no best yet": name checkpoint-0 itself
        folder = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        trainer.state.best_model_checkpoint = os.path.join(trainer._get_output_dir(trial=None), folder)
