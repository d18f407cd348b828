"""`DKMCallback`: the DKM schedule and cluster-health logging, for any `transformers.Trainer`.

milestone   steps [0, milestone) train the dense weights; at step `milestone` the centroids are initialised from
            the weights of that moment (k-means++ and Lloyd) and every later forward uses W~ = A C.
tau(s)      the softmax temperature of A = softmax(-||w - c||^2 / tau), scheduled per layer over the clustered
            steps s in [milestone, max_steps]: constant, or linear / cosine from tau_start to tau_end
            (progress p = (s - milestone) / (max_steps - milestone); cosine: tau_end + (tau_start - tau_end)
            * (1 + cos(pi p)) / 2). tau_start defaults to the layer's configured tau; tau_end to tau_start *
            tau_end_ratio, and that ratio to `config.default_tau_end_ratio(bits)` (1 at 4 bits and more, 0.1 below).
health      at every logging step: mean attention entropy H = -sum_j A_ij log A_ij (nats, on a sample of weights),
            the number of empty clusters (no weight has them as nearest centroid) and, from the second logging
            step on, the fraction of a fixed sample of weights whose nearest centroid changed since the last log
            and the mean centroid drift |C - C_last|. Empty and duplicate centroids are re-seeded on the weights
            farthest from their centroid.
FSDP2       these run between steps, when a sharded model's weights are shards: each reads a layer's weights while
            its unit is gathered (`gathered_by_unit`), one unit at a time; every rank does the same.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..config import default_tau_end_ratio
from ..nn.dkm import DKMWeight, dkm_modules
from ..nn.weights import is_whole
from ..ops.attention import all_finite, attention
from ..surgery.model import get_dkm_config
from .distributed import gathered_by_unit

logger = logging.get_logger(__name__)

TAU_SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_TAU_SCHEDULE = "cosine"  # with the default end ratio: flat at >= 4 bits, annealed to a tenth at <= 3 bits
HEALTH_SAMPLE = 4096  # weights per module whose attention entropy is measured
CHANGE_SAMPLE = 1 << 16  # weights per module whose assignment changes are tracked


def tau_at(step: int, milestone: int, max_steps: int, schedule: str, tau_start: float, tau_end: float) -> float:
    if schedule == "constant" or max_steps <= milestone:
        return tau_start
    progress = min(1.0, max(0.0, (step - milestone) / (max_steps - milestone)))
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * progress
    return tau_end + (tau_start - tau_end) * (1 + math.cos(math.pi * progress)) / 2


def check_tau_schedule(
    schedule: str, tau_start: float | None, tau_end: float | None, tau_end_ratio: float | None
) -> None:
    """A ValueError that names the problem for a schedule the callback cannot run."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"tau_schedule must be one of {list(TAU_SCHEDULES)}, got {schedule!r}")
    for name, value in (("tau_start", tau_start), ("tau_end", tau_end), ("tau_end_ratio", tau_end_ratio)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and 0 < value < math.inf):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if tau_end is not None and tau_end_ratio is not None:
        raise ValueError(
            f"give tau_end (one value for every layer) or tau_end_ratio (a fraction of each layer's starting tau), "
            f"not both: got tau_end={tau_end!r}, tau_end_ratio={tau_end_ratio!r}"
        )


def _cluster_sizes(assign: torch.Tensor, k: int) -> torch.Tensor:
    sizes = torch.zeros(assign.shape[0], k, dtype=torch.int64, device=assign.device)
    return sizes.scatter_add_(1, assign, torch.ones_like(assign))


def _sample(n: int, size: int) -> slice:
    return slice(None, None, max(1, -(-n // size)))


@torch.no_grad()
def cluster_health(module: DKMWeight, assign: torch.Tensor) -> dict[str, float]:
    """Mean attention entropy on a fixed sample of about HEALTH_SAMPLE weights (every few LUT groups, every few
    weights of each), and the number of empty clusters."""
    vectors = module.vectors()
    G, n, _ = vectors.shape
    per_group = min(n, HEALTH_SAMPLE)
    groups = _sample(G, max(1, HEALTH_SAMPLE // per_group))
    tau, _ = module.temperature(vectors, groups)  # tau of the sampled groups, from all their weights
    if isinstance(tau, torch.Tensor):
        tau = tau.view(-1, 1, 1)
    a = attention(vectors[groups, _sample(n, per_group)], module.centroids[groups], tau)
    return {
        "entropy": -(a * a.clamp_min(1e-30).log()).sum(1).mean().item(),
        "empty": int((_cluster_sizes(assign, module.layout.n_clusters) == 0).sum()),
    }


@torch.no_grad()
def reseed_dead_centroids(module: DKMWeight, assign: torch.Tensor | None = None) -> int:
    """Move empty or duplicate centroids onto the vectors that are farthest from their nearest centroid (in
    importance-weighted squared error where the weight's loop is weighted, `set_importance`)."""
    assign = module.assignments() if assign is None else assign
    sizes = _cluster_sizes(assign, module.layout.n_clusters)
    centroids = module.centroids
    G, k, d = centroids.shape
    # a centroid equal to one of lower index is a duplicate; found for many groups at once (per-row LUTs: 10^5 groups)
    duplicate = torch.empty_like(sizes, dtype=torch.bool)
    step = max(1, (1 << 24) // (k * k * d))
    for g0 in range(0, G, step):
        c = centroids[g0 : g0 + step]
        same = (c.unsqueeze(1) - c.unsqueeze(2)).abs().amax(-1) == 0  # [g, i, j]: c_j == c_i
        duplicate[g0 : g0 + step] = torch.triu(same, diagonal=1).any(1)
    dead_mask = (sizes == 0) | duplicate
    groups = dead_mask.any(1).nonzero().squeeze(1).tolist()
    vectors = module.vectors() if groups else None
    reseeded = 0
    for g in groups:
        c = centroids[g]
        dead = dead_mask[g].nonzero().squeeze(1)
        error = (vectors[g] - c[assign[g]]).square().sum(-1)
        if module.importance is not None:  # the objective of an importance-weighted loop
            error = error * module.importance[g]
        far = error.topk(min(dead.numel(), error.numel())).indices
        far = far[error[far] > 0]  # a vector its centroid already equals would only duplicate it again
        module.centroids[g, dead[: far.numel()]] = vectors[g, far]
        reseeded += far.numel()
    if reseeded:
        module.forget()
    return reseeded


@torch.no_grad()
def check_centroids_finite(modules: list[tuple[str, DKMWeight]], step: int, weights: bool = False) -> None:
    """Stop training once a layer's centroids went NaN or infinite (a diverged loss): every later step, evaluation
    and checkpoint would carry them. With `weights` (before a checkpoint or an evaluation), the weights the last
    optimizer step wrote too: their centroids only follow at the next forward. One host synchronisation per step,
    for all layers together. Weights FSDP2 holds sharded are left to the next step's centroids, which every process
    sees alike."""
    active = [(n, m) for n, m in modules if m.dkm_enabled and m.dkm_ready and m.has_state]
    checks = [(f"{n}.centroids", m.centroids) for n, m in active]
    if weights:
        checks += [(n, m.weight) for n, m in modules if is_whole(m.weight) and m.weight.is_floating_point()]
    if not checks:
        return
    finite = torch.stack([all_finite(tensor).to(checks[0][1].device) for _, tensor in checks])
    if bool(finite.all()):
        return
    name, tensor = next(check for check, ok in zip(checks, finite.tolist()) if not ok)
    bad = int((~torch.isfinite(tensor)).sum())
    raise FloatingPointError(
        f"{name}: {bad} value(s) became NaN or infinite at step {step} (the loss or the gradients diverged); "
        "training stopped before any checkpoint holds them. Lower the learning rate, clip gradients "
        "(max_grad_norm) or resume from the last checkpoint"
    )


class DKMCallback(TrainerCallback):
    """Milestone, tau schedule and cluster-health logging for any `transformers.Trainer` training a DKM model."""

    def __init__(
        self,
        milestone: int | None = None,
        tau_schedule: str = DEFAULT_TAU_SCHEDULE,
        tau_start: float | None = None,
        tau_end: float | None = None,
        tau_end_ratio: float | None = None,
        log_cluster_health: bool = True,
        reseed_dead_centroids: bool = True,
    ):
        check_tau_schedule(tau_schedule, tau_start, tau_end, tau_end_ratio)
        if milestone is not None and (isinstance(milestone, bool) or not isinstance(milestone, int) or milestone < 0):
            raise ValueError(f"milestone must be an integer >= 0, got {milestone!r}")
        self.milestone, self.tau_schedule = milestone, tau_schedule
        self.tau_start, self.tau_end, self.tau_end_ratio = tau_start, tau_end, tau_end_ratio
        self.log_cluster_health, self.reseed = log_cluster_health, reseed_dead_centroids
        self._previous: dict[str, torch.Tensor] = {}  # a fixed sample of each module's assignments at the last log
        self._centroids: dict[str, torch.Tensor] = {}
        self.pending: dict[str, float] = {}
        self._checked: int | None = None  # the last step whose cluster health was measured

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

    def _tau(self, module: DKMWeight, step: int, milestone: int, max_steps: int) -> float:
        start = self.tau_start if self.tau_start is not None else module.settings.configured_tau
        if self.tau_end is not None:
            end = self.tau_end
        else:
            ratio = self.tau_end_ratio if self.tau_end_ratio is not None else default_tau_end_ratio(module.layout.bits)
            end = start * ratio
        return tau_at(step, milestone, max_steps, self.tau_schedule, start, end)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        milestone, self._checked = self._milestone(model), None
        if milestone >= state.max_steps > 0:
            logger.warning(
                f"dkm_hf: the DKM milestone ({milestone}) is at or past the run's last step ({state.max_steps}): no "
                "step clusters, and the saved model snaps the trained weights onto the centroids of loading time"
            )
        for _, module in self._modules(model):
            # At step == milestone > 0 (a fresh run or a resume from checkpoint-<milestone>) clustering is still off:
            # on_step_begin initialises the centroids from the weights of that moment, then switches it on.
            module.dkm_enabled = state.global_step > milestone or milestone == 0
        uninitialised = [(n, m) for n, m in self._modules(model) if m.dkm_enabled and not m.dkm_ready]
        for _, module in gathered_by_unit(model, uninitialised):
            module.init_centroids()
        step = state.global_step
        resumed = step > milestone and step % self._health_every(args, state) == 0
        if self.log_cluster_health and resumed and all(m.dkm_ready for _, m in self._modules(model)):
            # a resume from a step that measured cluster health (saves every k logging steps): its samples, taken
            # again from the checkpoint's weights and centroids, so that the first log after the resume has
            # dkm_changed_fraction / dkm_centroid_drift as an uninterrupted run's has
            for name, module in gathered_by_unit(model, self._modules(model)):
                self._remember(name, module, module.assignments())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        milestone = self._milestone(model)
        step = state.global_step
        taus = []
        starting = [(n, m) for n, m in self._modules(model) if step == milestone and not m.dkm_enabled]
        for _, module in gathered_by_unit(model, starting):
            module.init_centroids()
        for _, module in self._modules(model):
            module.dkm_enabled = step >= milestone
            module.settings.tau = self._tau(module, step, milestone, state.max_steps)
            taus.append(module.settings.tau)
        # the tau most layers use; with several (mixed bit widths take the default of each), their range too
        self.pending["dkm_tau"] = Counter(taus).most_common(1)[0][0]
        if len(set(taus)) > 1:
            self.pending["dkm_tau_min"], self.pending["dkm_tau_max"] = min(taus), max(taus)
        self.pending["dkm_enabled"] = float(step >= milestone)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # epoch strategies decide here (the flow callback, first, has set the flags) to log, save or evaluate
        if control.should_log:
            self._health(args, state, model, logging=True)
        if control.should_save or control.should_evaluate:
            check_centroids_finite(self._modules(model), state.global_step, weights=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._health(args, state, model, logging=control.should_log)
        # Trainer's flow callback, which runs first, has decided whether this step saves or evaluates
        before_a_save = control.should_save or control.should_evaluate or control.should_training_stop
        check_centroids_finite(self._modules(model), state.global_step, weights=before_a_save)

    def _health(self, args, state, model, logging: bool) -> None:
        # Runs on every rank (unlike on_log), so the re-seeding stays identical across processes: at each step that
        # logs (Trainer's flow callback has decided: every logging_steps, the first step, each epoch's end), every
        # logging_steps whatever the strategy (the re-seeding's pace) and at the last step; once a step.
        step = state.global_step
        # the step that ends at a milestone > 0 trained dense: its centroids are made at the next step's beginning
        if not (self.log_cluster_health or self.reseed) or step <= self._milestone(model) or step == self._checked:
            return
        if not (logging or step % self._health_every(args, state) == 0 or step == state.max_steps):
            return
        self._checked = step
        entropy, empty, changed, drift, reseeded = [], 0, [], [], 0
        for name, module in gathered_by_unit(model, self._modules(model)):
            assign = module.assignments()
            stats = cluster_health(module, assign)
            entropy.append(stats["entropy"])
            empty += stats["empty"]
            if name in self._previous:
                changed.append((self._sample_of(assign) != self._previous[name]).float().mean().item())
                drift.append((module.centroids - self._centroids[name]).abs().mean().item())
            moved = reseed_dead_centroids(module, assign) if self.reseed else 0
            reseeded += moved
            # the next log compares with what training goes on from (as after a resume from this step): the moves
            # of the re-seeding are counted in dkm_reseeded, not in the next dkm_changed_fraction
            self._remember(name, module, module.assignments() if moved else assign)
        if self.log_cluster_health:
            self.pending.update(
                {
                    "dkm_entropy": sum(entropy) / len(entropy),
                    "dkm_empty_clusters": float(empty),
                    "dkm_reseeded": float(reseeded),
                }
            )
            if changed:  # only once there is a previous logging step to compare with
                self.pending["dkm_changed_fraction"] = sum(changed) / len(changed)
                self.pending["dkm_centroid_drift"] = sum(drift) / len(drift)

    @staticmethod
    def _health_every(args, state) -> int:
        """The steps between health checks whatever the logging strategy: logging_steps (Trainer's steps for a
        ratio < 1)."""
        return max(1, int(state.logging_steps or args.logging_steps))

    @staticmethod
    def _sample_of(assign: torch.Tensor) -> torch.Tensor:
        flat = assign.view(-1)
        return flat[_sample(flat.numel(), CHANGE_SAMPLE)].to(torch.uint8)

    def _remember(self, name: str, module: DKMWeight, assign: torch.Tensor) -> None:
        """What the next health check compares with: a fixed sample of the assignments and the centroids."""
        self._previous[name] = self._sample_of(assign)
        self._centroids[name] = module.centroids.detach().clone()

    def _dkm_merge_logs(self, logs: dict | None) -> None:
        """The DKM metrics into a training log; called before any callback sees it (transformers_patches (13)), so
        the reporting integrations, which Trainer lists before a user's callbacks, log them too."""
        if logs is not None and "loss" in logs:
            logs.update(self.pending)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # `_dkm_merge_logs` has added them to `logs` before any callback ran
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self.pending)
            self.pending = {}  # each value is logged once: the next log gets those set after this one
