"""Fine-tuning with DKM: `DKMTrainingArguments` and `DKMTrainer` (a `Trainer` with `DKMCallback`, hard and soft
evaluation, and palettized saving).

    composing   `DKMTrainerMixin` is all of that for any `Trainer` subclass (`class DKMSFTTrainer(DKMTrainerMixin,
                trl.SFTTrainer)`); `DKMTrainer` is `DKMTrainerMixin` + `Trainer`. The DKM fields are
                `DKMTrainingFields`; `with_dkm_arguments(SFTConfig)` adds them to another arguments class, and a
                trainer given arguments without them uses their defaults.

    saving      checkpoints written during training keep float weights + centroids (resumable exactly); a user's
                `trainer.save_model(dir)` and `trainer.push_to_hub()` write the palettized checkpoint (LUT + packed
                indices) while the in-memory model stays trainable.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from functools import cache

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..nn.dkm import dkm_modules
from ..surgery.importance import dense_eval
from ..surgery.model import get_dkm_config, palettized_view
from .callback import DEFAULT_TAU_SCHEDULE, DKMCallback, check_tau_schedule
from .distillation import NEEDS_LABELS, check_teacher, distilled_loss, model_bytes, prepare_teacher
from .distributed import full_state_dict, full_weights, saves_no_full_model
from .resume import checkpoint_initial_model, model_problem, resolve_resume, saves_state_dict_only, wrapper_hint
from .transformers_patches import accumulated_batch_share, counted_labels

logger = logging.get_logger(__name__)


@dataclass
class DKMTrainingFields:
    """The DKM fields of `DKMTrainingArguments`, to be mixed into a `TrainingArguments` subclass before it (as
    `DKMTrainingArguments` and `with_dkm_arguments` do): its `__post_init__` runs the arguments class's own first.
    Milestone and tau default to the model's DKMConfig."""

    dkm_milestone: int | None = field(default=None, metadata={"help": "Step at which clustering starts."})
    tau_schedule: str = field(
        default=DEFAULT_TAU_SCHEDULE,
        metadata={
            "help": "constant, linear or cosine, from tau_start to tau_end. With the default end ratio, cosine is "
            "flat at 4 bits and more and anneals to a tenth at 3 bits and fewer."
        },
    )
    tau_start: float | None = field(
        default=None, metadata={"help": "tau at the milestone, every layer (default: each layer's configured tau)."}
    )
    tau_end: float | None = field(
        default=None, metadata={"help": "tau at the last step, every layer (default: tau_start * tau_end_ratio)."}
    )
    tau_end_ratio: float | None = field(
        default=None,
        metadata={
            "help": "tau at the last step as a fraction of each layer's tau_start. Default: 1 at 4 bits and more, "
            "0.1 at 3 bits and fewer (dkm_hf.config.default_tau_end_ratio)."
        },
    )
    eval_soft: bool = field(default=False, metadata={"help": "Also evaluate the soft model (eval_soft_* metrics)."})
    palettize_on_save: bool = field(
        default=True, metadata={"help": "save_model()/push_to_hub() write the palettized checkpoint."}
    )
    log_cluster_health: bool = field(default=True, metadata={"help": "Log entropy, empty clusters, drift."})
    reseed_dead_centroids: bool = field(default=True, metadata={"help": "Re-seed empty/duplicate centroids."})
    eval_hard_on_start: bool = field(
        default=True,
        metadata={
            "help": "With evaluation on: evaluate the hard model before training (at step 0 it is post-training "
            "k-means), so that load_best_model_at_end can return to it."
        },
    )
    initial_model_margin: float = field(
        default=0.0,
        metadata={
            "help": "With load_best_model_at_end and the step-0 evaluation: a trained checkpoint replaces the "
            "post-training model of step 0 as the best model only when metric_for_best_model beats it by more than "
            "this, in the metric's units (e.g. one standard error of the validation accuracy). The best of several "
            "noisy evaluations beats step 0 by chance; the margin asks for more than that."
        },
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term when a teacher is given."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    distill_hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state MSE (every layer) when a teacher is given."}
    )

    def __post_init__(self):
        super().__post_init__()  # the TrainingArguments class this is mixed into
        check_tau_schedule(self.tau_schedule, self.tau_start, self.tau_end, self.tau_end_ratio)
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if not (self.distill_temperature > 0 and self.distill_hidden_weight >= 0):
            raise ValueError(
                f"distill_temperature must be > 0 and distill_hidden_weight >= 0, got {self.distill_temperature!r} "
                f"and {self.distill_hidden_weight!r}"
            )
        if not self.initial_model_margin >= 0:
            raise ValueError(f"initial_model_margin must be >= 0, got {self.initial_model_margin!r}")
        if self.initial_model_margin and not (self.load_best_model_at_end and self.eval_hard_on_start):
            raise ValueError(
                "initial_model_margin compares trained checkpoints with the step-0 model: it needs "
                "load_best_model_at_end=True and eval_hard_on_start=True"
            )
        if self.torch_compile:
            raise ValueError(NO_COMPILE)


NO_COMPILE = (
    "torch_compile=True is not supported with DKM: the clustering loop stops early on a data-dependent test and runs "
    "outside the compiled graph; train without it"
)
DKM_DEFAULTS = {f.name: f.default for f in fields(DKMTrainingFields) if f.default is not MISSING}


@dataclass
class DKMTrainingArguments(DKMTrainingFields, TrainingArguments):
    """`TrainingArguments` plus the DKM schedule. Milestone and tau default to the model's DKMConfig."""


def _rebuild_arguments(base: type[TrainingArguments]) -> TrainingArguments:
    cls = with_dkm_arguments(base)
    return cls.__new__(cls)


def _reduce_arguments(self) -> tuple:
    """Pickle (Trainer's training_args.bin) a generated class by its arguments class: it has no importable name."""
    return _rebuild_arguments, (type(self).__bases__[1],), dict(self.__dict__)


@cache
def with_dkm_arguments(args_cls: type[TrainingArguments]) -> type[TrainingArguments]:
    """`args_cls` (a `TrainingArguments` subclass, e.g. TRL's `SFTConfig`) with the fields of `DKMTrainingFields`
    added, its own defaults kept: `with_dkm_arguments(SFTConfig)(output_dir=..., max_length=512, distill_alpha=0.5)`.
    The class is made once per `args_cls`, and `HfArgumentParser` / `TrlParser` read its fields like any other."""
    if not (isinstance(args_cls, type) and issubclass(args_cls, TrainingArguments)):
        raise TypeError(f"with_dkm_arguments needs a TrainingArguments subclass, got {args_cls!r}")
    if issubclass(args_cls, DKMTrainingFields):
        return args_cls
    name = f"DKM{args_cls.__name__}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"`{args_cls.__name__}` plus the DKM fields of `DKMTrainingFields`.",
        "__reduce__": _reduce_arguments,
    }
    return dataclass(type(name, (DKMTrainingFields, args_cls), namespace))


class DKMTrainerMixin:
    """What `DKMTrainer` adds to `Trainer`, for any `Trainer` subclass listed after it:
    `class DKMSFTTrainer(DKMTrainerMixin, trl.SFTTrainer)`. Adds `DKMCallback`, hard + soft evaluation, palettized
    saving and, with `teacher_model`, distillation from the dense model (see `distillation`). The DKM options are the
    fields of `DKMTrainingFields` on the trainer's arguments (`DKMTrainingArguments`, `with_dkm_arguments(SFTConfig)`);
    arguments without them get their defaults.

    Evaluation (with `eval_hard_on_start`) starts at step 0, where the hard model is post-training k-means; with
    `load_best_model_at_end=True` that model is checkpointed too, so the model a run ends with is never worse, by
    `metric_for_best_model`, than post-training palettization.
    """

    def __init__(self, *args, teacher_model: nn.Module | None = None, **kwargs):
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__}: DKMTrainerMixin goes before a Trainer subclass in the bases, as in "
                "class DKMSFTTrainer(DKMTrainerMixin, SFTTrainer)"
            )
        self.teacher = None
        # the distillation terms since the last log, each micro-batch's weighted by its labelled items (as Trainer
        # weighs their losses within a step), and the items: logged as means
        self._distill_sums: dict[str, torch.Tensor] = {}
        self._distill_items: torch.Tensor | int = 0
        self._palettize_next_save = False
        super().__init__(*args, **kwargs)
        if get_dkm_config(self.model) is None or not dkm_modules(self.model):
            raise ValueError(
                f"{type(self).__name__} needs a DKM model: from_pretrained(path, dkm_config=DKMConfig(...)) or "
                "dkm_hf.prepare(model, DKMConfig(...))" + wrapper_hint(self.model)
            )
        if self.args.torch_compile:  # plain TrainingArguments / SFTConfig carry no DKM fields to refuse it
            raise ValueError(NO_COMPILE)
        if any(isinstance(c, DKMCallback) for c in self.callback_handler.callbacks):
            raise ValueError(
                f"{type(self).__name__} adds its own DKMCallback from the arguments' dkm_* fields (tau_schedule, "
                "tau_start, ...); set them there instead of passing a DKMCallback, or use a plain Trainer with yours"
            )
        names = (
            "tau_schedule",
            "tau_start",
            "tau_end",
            "tau_end_ratio",
            "log_cluster_health",
            "reseed_dead_centroids",
        )
        self.dkm_callback = DKMCallback(self.dkm_option("dkm_milestone"), **{n: self.dkm_option(n) for n in names})
        self.add_callback(self.dkm_callback)
        a = self.args
        if teacher_model is not None:
            check_teacher(self)
            student = next(self.model.parameters())
            self.teacher = prepare_teacher(teacher_model, a.device, student.dtype)
            self.dkm_callback.pending["dkm_teacher_mb"] = model_bytes(self.teacher) / 2**20
        reference = getattr(self, "ref_model", None)  # TRL's (DPO, KTO, GRPO): loaded with the policy's dkm_config?
        for _, weight in dkm_modules(self.accelerator.unwrap_model(reference)) if reference is not None else ():
            weight.dkm_enabled = False  # dense, as TRL loads it from a policy instance and precomputes it here

    def compute_ref_log_probs(self, model, *args, **kwargs):
        """TRL's DPO reference, precomputed from the policy: its dense model, as the reference TRL loads (before: the
        hard model here, the dense one there; a reference loaded with the policy's dkm_config: dense as well)."""
        with dense_eval(self.accelerator.unwrap_model(model)):
            return super().compute_ref_log_probs(model, *args, **kwargs)

    def dkm_option(self, name: str):
        """The DKM field `name` of the trainer's arguments; its `DKMTrainingFields` default when they lack it."""
        return getattr(self.args, name, DKM_DEFAULTS[name])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer's `train`; `resume_from_checkpoint=True` takes the newest complete `checkpoint-N` (a run killed
        while saving leaves an incomplete one, skipped with a warning), and a directory that cannot be resumed from
        (a palettized checkpoint, an incomplete one) is refused saying why."""
        bare = saves_state_dict_only(self)  # a model built in code: Trainer saves no config.json
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir, bare)
        problem = model_problem(resume, self.model, bare) if resume is not None else None
        if problem is not None:
            raise ValueError(f"cannot resume training from {resume}: {problem}")
        # step 0's hard evaluation, for this run only: the caller's arguments stay as they were (a control run may
        # share them), and a resume does not evaluate its starting step again
        a = self.args
        start = resume is None and not a.eval_on_start and self.dkm_option("eval_hard_on_start")
        start = start and a.eval_strategy != "no" and self.eval_dataset is not None
        a.eval_on_start = a.eval_on_start or start
        try:
            return super().train(resume, *args, **kwargs)
        finally:
            a.eval_on_start = a.eval_on_start and not start

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The training loss, the same for every split of a global batch into micro-batches and processes.

        When Trainer has counted the labelled items of the accumulated batch (`num_items_in_batch`, for models whose
        forward takes `**kwargs`), it no longer divides the loss by the accumulation steps and expects it normalised
        by that count. The loss here is the micro-batch's mean (the model's own loss, or the distillation mix), made
        the micro-batch's share of the whole by `accumulated_batch_share`; a model that ignores the count (BERT's
        sequence classification) and the distillation terms are scaled right that way. Otherwise Trainer divides the
        mean by the accumulation steps itself. A subclass whose own `compute_loss` sets `loss_is_scaled_for_ga` (as
        transformers asks) computes the loss as it says, with the count.
        """
        stated = getattr(self, "loss_is_scaled_for_ga", None) is not None  # transformers >= 5.19
        custom = self.compute_loss_func is not None or not self.model_accepts_loss_kwargs or stated
        labelled = isinstance(inputs.get("labels"), torch.Tensor)  # not DETR's list of dicts, nor QA's positions
        if model.training and self.teacher is not None and not labelled:
            raise ValueError(NEEDS_LABELS.format(keys=sorted(inputs)))
        if not model.training or (custom and self.teacher is None) or not labelled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, shifted = counted_labels(self, inputs)
        targets = labels.ne(-100)
        items = targets.sum()
        if self.teacher is None:
            # outputs only when asked for: TRL's SFTTrainer computes the logits for them in another forward
            result = super().compute_loss(model, inputs, return_outputs=return_outputs)
            loss, outputs = result if return_outputs else (result, None)
        else:
            loss, outputs, terms = distilled_loss(
                model,
                self.teacher,
                inputs,
                self.dkm_option("distill_alpha"),
                self.dkm_option("distill_temperature"),
                self.dkm_option("distill_hidden_weight"),
                targets,
                shifted,
            )
            for name, value in terms.items():  # device tensors: no host sync until the log
                self._distill_sums[name] = self._distill_sums.get(name, 0) + value * items
            self._distill_items = self._distill_items + items
        scaled = self.loss_is_scaled_for_ga if stated else not custom  # whether Trainer leaves the loss as it is
        if num_items_in_batch is not None and scaled:
            # a micro-batch without a labelled item has no mean (nan): its share of the step is nothing
            loss = torch.where(items > 0, loss * accumulated_batch_share(self, items, num_items_in_batch), 0.0)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # the training log, which Trainer writes on every process after reducing the loss
            items, sums = self._distill_items, self._distill_sums
            if sums and self.accelerator.num_processes > 1:  # the global batch's terms, as the loss
                first = next(iter(sums.values()))
                total = self.accelerator.reduce(torch.stack([torch.as_tensor(items).to(first), *sums.values()]), "sum")
                items, sums = total[0], dict(zip(sums, total[1:]))
            terms = {name: (value / items.clamp_min(1)).item() for name, value in sums.items()}
            self._distill_sums, self._distill_items = {}, 0
            logs = {**logs, **terms}  # DKMCallback adds its own before any callback sees the log
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs):
        """Metrics of the hard (palettized) model, the one that ships; with `eval_soft`, the soft model's next to them
        as `{prefix}_soft_*`, in the same log entry (see `evaluation_loop`). Other keyword arguments go to the
        Trainer class's own `evaluate` (Seq2SeqTrainer's generation settings)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        # the training loop's call only (eval_dataset None): with a dict of eval datasets Trainer calls evaluate once
        # per dataset with its partial metrics, then returns them merged, and the best-model rule needs them merged
        outer = eval_dataset is None
        if outer and self.is_in_train and self.state.global_step == 0 and self.args.load_best_model_at_end:
            checkpoint_initial_model(self, metrics)  # post-training k-means: a candidate for the best model
        return metrics

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """Transformers' rule, except that while the post-training model of step 0 is the best, a trained checkpoint
        must beat it by `initial_model_margin`."""
        margin = self.dkm_option("initial_model_margin")
        initial = self.state.best_metric
        if not (margin and self.state.global_step > 0 and initial is not None and self._initial_model_is_best()):
            return super()._determine_best_metric(metrics, trial)
        self.state.best_metric = initial + margin if self.args.greater_is_better else initial - margin
        is_new_best = False
        try:
            is_new_best = super()._determine_best_metric(metrics, trial)
        finally:
            if not is_new_best:  # the recorded best stays step 0's own metric
                self.state.best_metric = initial
        return is_new_best

    def _initial_model_is_best(self) -> bool:
        best = self.state.best_model_checkpoint
        return best is not None and os.path.basename(os.path.normpath(best)) == f"{PREFIX_CHECKPOINT_DIR}-0"

    def _evaluation_loop(
        self, dataloader, description: str, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop; in an evaluation with `eval_soft`, the same batches run first with the soft DKM weights,
        their metrics added as `{prefix}_soft_*`. Here the batches are the ones the trainer class prepared (TRL's
        SFTTrainer tokenizes a dataset given to `evaluate`), and the metrics are logged with the hard ones."""
        soft = {}
        if description == "Evaluation" and self.dkm_option("eval_soft"):
            saved = [(module, module.soft_eval) for _, module in dkm_modules(self.model)]
            for module, _ in saved:
                module.soft_eval = True
            try:
                output = super().evaluation_loop(
                    dataloader,
                    "Evaluation (soft DKM weights)",
                    prediction_loss_only,
                    ignore_keys,
                    f"{metric_key_prefix}_soft",
                )
            finally:
                for module, soft_eval in saved:
                    module.soft_eval = soft_eval
            soft = {k: v for k, v in output.metrics.items() if not k.endswith(("_runtime", "_per_second"))}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(soft)
        return output

    def evaluation_loop(self, dataloader, description: str, *args, **kwargs):
        """Before the DKM milestone the training forward uses the dense weights; an evaluation still measures the
        hard model (the trained weights on the centroids they have), which is what `save_model` would ship then and
        what the best-model rule must compare."""
        ready = [m for _, m in dkm_modules(self.model) if not m.dkm_enabled and (m.dkm_ready or m.tied_source)]
        for module in ready:
            module.dkm_enabled = True
        try:
            return self._evaluation_loop(dataloader, description, *args, **kwargs)
        finally:
            for module in ready:
                module.dkm_enabled = False
                module.forget()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        palettize = self.dkm_option("palettize_on_save") and (not _internal_call or self._palettize_next_save)
        if not palettize:
            return super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            logger.warning(
                "dkm_hf: save_model of a peft model writes its adapter only; the palettized base it was trained "
                "on is not saved: write it with dkm_hf.palettize(copy.deepcopy(model).unload()).save_pretrained(path)"
            )
        with palettized_view(model, gathered=full_weights):
            if saves_no_full_model(self):
                self._save(output_dir, full_state_dict(model))
            else:
                super().save_model(output_dir, _internal_call)

    def push_to_hub(self, *args, **kwargs):
        self._palettize_next_save = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._palettize_next_save = False


class DKMTrainer(DKMTrainerMixin, Trainer):
    """A `Trainer` for DKM models: `DKMTrainerMixin` on `transformers.Trainer`."""
