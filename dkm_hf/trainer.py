"""Fine-tuning with DKM: `DKMTrainingArguments`, `DKMTrainer` and `DKMCallback` (for a plain `Trainer`).

What training adds to a DKM model:

    milestone   steps [0, milestone) train the dense weights; at step `milestone` the centroids are initialised from
                the weights of that moment (k-means++ and Lloyd) and every later forward uses W~ = A C.
    tau(s)      the softmax temperature of A = softmax(-||w - c||^2 / tau), scheduled over the clustered steps
                s in [milestone, max_steps]: constant, or linear / cosine from tau_start to tau_end
                (progress p = (s - milestone) / (max_steps - milestone); cosine: tau_end + (tau_start - tau_end)
                * (1 + cos(pi p)) / 2).
    health      at every logging step: mean attention entropy H = -sum_j A_ij log A_ij (nats, a sample of weights),
                the fraction of weights whose nearest centroid changed since the last log, the mean centroid drift
                |C - C_last|, and the number of empty clusters (no weight has them as nearest centroid). Empty and
                duplicate centroids are re-seeded on the weights farthest from their centroid.
    saving      checkpoints written during training keep float weights + centroids (resumable exactly); a user's
                `trainer.save_model(dir)` and `trainer.push_to_hub()` write the palettized checkpoint (LUT + packed
                indices) while the in-memory model stays trainable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .clustering import attention
from .layers import DKMMixin, dkm_modules
from .model import get_dkm_config, palettized_view

logger = logging.get_logger(__name__)

TAU_SCHEDULES = ("constant", "linear", "cosine")


def tau_at(step: int, milestone: int, max_steps: int, schedule: str, tau_start: float, tau_end: float) -> float:
    if schedule == "constant" or max_steps <= milestone:
        return tau_start
    progress = min(1.0, max(0.0, (step - milestone) / (max_steps - milestone)))
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * progress
    return tau_end + (tau_start - tau_end) * (1 + math.cos(math.pi * progress)) / 2


def _cluster_sizes(assign: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(assign.shape[0], k, dtype=torch.int64).scatter_add_(1, assign, torch.ones_like(assign))


@torch.no_grad()
def cluster_health(module: DKMMixin, assign: torch.Tensor, previous: torch.Tensor | None, sample: int = 4096):
    """Mean attention entropy on a fixed sample of weights, empty clusters, fraction of changed assignments."""
    vectors = module.geometry.to_vectors(module._scaled_rows(module.weight.detach().float()))
    a = attention(vectors[:, :: max(1, vectors.shape[1] // sample)], module.centroids, module.spec.tau)
    return {
        "entropy": -(a * a.clamp_min(1e-30).log()).sum(-1).mean().item(),
        "empty": int((_cluster_sizes(assign, module.spec.n_clusters) == 0).sum()),
        "changed": float((assign != previous).float().mean()) if previous is not None else 0.0,
    }


@torch.no_grad()
def reseed_dead_centroids(module: DKMMixin, assign: torch.Tensor | None = None) -> int:
    """Move empty or duplicate centroids onto the vectors that are farthest from their nearest centroid."""
    assign = module.assignments() if assign is None else assign
    k = module.spec.n_clusters
    sizes = _cluster_sizes(assign, k)
    vectors = module.geometry.to_vectors(module._scaled_rows(module.weight.detach().float()))
    reseeded = 0
    for g in range(assign.shape[0]):
        c = module.centroids[g]
        same = (c.unsqueeze(0) - c.unsqueeze(1)).abs().amax(-1) == 0
        duplicate = torch.triu(same, diagonal=1).any(0)
        dead = ((sizes[g] == 0) | duplicate).nonzero().squeeze(1)
        if dead.numel() == 0:
            continue
        error = (vectors[g] - c[assign[g]]).square().sum(-1)
        far = error.topk(min(dead.numel(), error.numel())).indices
        module.centroids[g, dead[: far.numel()]] = vectors[g, far]
        reseeded += far.numel()
    if reseeded:
        module._hard = None
    return reseeded


class DKMCallback(TrainerCallback):
    """Milestone, tau schedule and cluster-health logging for any `transformers.Trainer` training a DKM model."""

    def __init__(
        self,
        milestone: int | None = None,
        tau_schedule: str = "constant",
        tau_start: float | None = None,
        tau_end: float | None = None,
        log_cluster_health: bool = True,
        reseed_dead_centroids: bool = True,
    ):
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {list(TAU_SCHEDULES)}, got {tau_schedule!r}")
        for name, value in (("tau_start", tau_start), ("tau_end", tau_end)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if milestone is not None and milestone < 0:
            raise ValueError(f"milestone must be >= 0, got {milestone!r}")
        self.milestone, self.tau_schedule = milestone, tau_schedule
        self.tau_start, self.tau_end = tau_start, tau_end
        self.log_cluster_health, self.reseed = log_cluster_health, reseed_dead_centroids
        self._base_tau: dict[str, float] = {}
        self._previous: dict[str, torch.Tensor] = {}
        self._centroids: dict[str, torch.Tensor] = {}
        self.pending: dict[str, float] = {}

    def _modules(self, model):
        modules = [(n, m) for n, m in dkm_modules(model) if m.tied_source is None]
        if not modules:
            raise ValueError("DKMCallback needs a model with DKM modules: load it with dkm_config=DKMConfig(...)")
        return modules

    def _milestone(self, model) -> int:
        if self.milestone is not None:
            return self.milestone
        config = get_dkm_config(model)
        return config.milestone if config is not None else 0

    def _tau(self, name: str, step: int, milestone: int, max_steps: int) -> float:
        start = self.tau_start if self.tau_start is not None else self._base_tau[name]
        end = self.tau_end if self.tau_end is not None else start
        return tau_at(step, milestone, max_steps, self.tau_schedule, start, end)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        milestone = self._milestone(model)
        for name, module in self._modules(model):
            self._base_tau.setdefault(name, module.spec.tau)
            module.dkm_enabled = state.global_step >= milestone
            if state.global_step > milestone and not module.dkm_ready:
                module.init_centroids()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        milestone = self._milestone(model)
        step = state.global_step
        taus = []
        for name, module in self._modules(model):
            if step == milestone and not module.dkm_enabled:
                module.init_centroids()
            module.dkm_enabled = step >= milestone
            module.spec.tau = self._tau(name, step, milestone, state.max_steps)
            taus.append(module.spec.tau)
        self.pending["dkm_tau"] = taus[0]  # the first module's: one schedule, all modules
        self.pending["dkm_enabled"] = float(step >= milestone)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Runs on every rank (unlike on_log), so the re-seeding stays identical across processes.
        if not (self.log_cluster_health or self.reseed) or state.global_step < self._milestone(model):
            return
        if not (state.global_step % max(1, int(args.logging_steps)) == 0 or state.global_step == state.max_steps):
            return
        entropy, empty, changed, drift, reseeded = [], 0, [], [], 0
        for name, module in self._modules(model):
            assign = module.assignments()
            stats = cluster_health(module, assign, self._previous.get(name))
            entropy.append(stats["entropy"])
            changed.append(stats["changed"])
            empty += stats["empty"]
            self._previous[name] = assign.to(torch.uint8)
            if name in self._centroids:
                drift.append((module.centroids - self._centroids[name]).abs().mean().item())
            if self.reseed:
                reseeded += reseed_dead_centroids(module, assign)
            self._centroids[name] = module.centroids.detach().clone()
        if self.log_cluster_health:
            self.pending.update(
                {
                    "dkm_entropy": sum(entropy) / len(entropy),
                    "dkm_changed_fraction": sum(changed) / len(changed),
                    "dkm_centroid_drift": sum(drift) / len(drift) if drift else 0.0,
                    "dkm_empty_clusters": float(empty),
                    "dkm_reseeded": float(reseeded),
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self.pending)


@dataclass
class DKMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the DKM schedule. Milestone and tau default to the model's DKMConfig."""

    dkm_milestone: int | None = field(default=None, metadata={"help": "Step at which clustering starts."})
    tau_schedule: str = field(default="constant", metadata={"help": "constant, linear or cosine."})
    tau_start: float | None = field(default=None, metadata={"help": "tau at the milestone (default: config's)."})
    tau_end: float | None = field(default=None, metadata={"help": "tau at the last step (default: tau_start)."})
    eval_soft: bool = field(default=False, metadata={"help": "Also evaluate the soft model (eval_soft_* metrics)."})
    palettize_on_save: bool = field(
        default=True, metadata={"help": "save_model()/push_to_hub() write the palettized checkpoint."}
    )
    log_cluster_health: bool = field(default=True, metadata={"help": "Log entropy, empty clusters, drift."})
    reseed_dead_centroids: bool = field(default=True, metadata={"help": "Re-seed empty/duplicate centroids."})

    def __post_init__(self):
        super().__post_init__()
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {list(TAU_SCHEDULES)}, got {self.tau_schedule!r}")
        if self.torch_compile:
            raise ValueError(
                "torch_compile=True is not supported with DKM: the clustering loop stops early on a "
                "data-dependent test and runs outside the compiled graph; train without it"
            )


class DKMTrainer(Trainer):
    """A `Trainer` for DKM models: adds `DKMCallback`, hard + soft evaluation and palettized saving."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if get_dkm_config(self.model) is None or not dkm_modules(self.model):
            raise ValueError(
                "DKMTrainer needs a DKM model: from_pretrained(path, dkm_config=DKMConfig(...)) or "
                "dkm_hf.prepare(model, DKMConfig(...))"
            )
        a = self.args
        options = {
            "milestone": getattr(a, "dkm_milestone", None),
            "tau_schedule": getattr(a, "tau_schedule", "constant"),
            "tau_start": getattr(a, "tau_start", None),
            "tau_end": getattr(a, "tau_end", None),
            "log_cluster_health": getattr(a, "log_cluster_health", True),
            "reseed_dead_centroids": getattr(a, "reseed_dead_centroids", True),
        }
        self.dkm_callback = DKMCallback(**options)
        self.add_callback(self.dkm_callback)
        self._palettize_next_save = False
        self._soft_metrics: dict = {}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self.dkm_callback.pending}
        if self._soft_metrics and any(key in logs for key in self._soft_metrics["_anchor"]):
            logs = {**logs, **{k: v for k, v in self._soft_metrics.items() if k != "_anchor"}}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Metrics of the hard (palettized) model, the one that ships; with `eval_soft`, the soft model's next to them
        as `{prefix}_soft_*`, in the same log entry."""
        soft = {}
        if getattr(self.args, "eval_soft", False):
            soft = self._evaluate_soft(eval_dataset, ignore_keys, metric_key_prefix)
        self._soft_metrics = {**soft, "_anchor": (f"{metric_key_prefix}_loss", f"{metric_key_prefix}_runtime")}
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._soft_metrics = {}
        return {**metrics, **soft}

    def _evaluate_soft(self, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            return {}
        modules = dkm_modules(self.model)
        for _, module in modules:
            module.soft_eval = True
        try:
            output = self.evaluation_loop(
                self.get_eval_dataloader(dataset),
                description="Evaluation (soft DKM weights)",
                prediction_loss_only=True if self.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=f"{metric_key_prefix}_soft",
            )
        finally:
            for _, module in modules:
                module.soft_eval = False
        return {k: v for k, v in output.metrics.items() if not k.endswith(("_runtime", "_per_second"))}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        palettize = getattr(self.args, "palettize_on_save", True) and (not _internal_call or self._palettize_next_save)
        if not palettize:
            return super().save_model(output_dir, _internal_call)
        with palettized_view(self.accelerator.unwrap_model(self.model)):
            super().save_model(output_dir, _internal_call)

    def push_to_hub(self, *args, **kwargs):
        self._palettize_next_save = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._palettize_next_save = False
