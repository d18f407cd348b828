from __future__ import annotations

import copy
import json
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within, free_port, weight_rounding
from torch import nn
from toy import ToyDataset, accuracy, save_toy_bert
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import dkm_hf
from dkm_hf import DKMCallback, DKMConfig, DKMTrainer, DKMTrainingArguments
from dkm_hf.integrations.callback import CHANGE_SAMPLE, tau_at

CONFIG = {"bits": 3, "tau": 0.05, "weight_threshold": 1000}  # relative to each layer's weight variance


def _args(tmp_path, cls=DKMTrainingArguments, **kw):
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 16,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "max_steps": 12,
        "lr_scheduler_type": "linear",
    }
    return cls(**{**base, **kw})


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return save_toy_bert(tmp_path_factory.mktemp("toy") / "bert")


def _model(path, **overrides):
    return AutoModelForSequenceClassification.from_pretrained(path, dkm_config=DKMConfig(**{**CONFIG, **overrides}))


def test_plain_trainer_updates_every_clustered_weight_and_centroids(toy_path, tmp_path):
    model = _model(toy_path)
    before = {n: (m.weight.detach().clone(), m.centroids.clone()) for n, m in dkm_hf.dkm_modules(model)}
    trainer = Trainer(model=model, args=_args(tmp_path, TrainingArguments, max_steps=4), train_dataset=ToyDataset(64))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    for name, module in dkm_hf.dkm_modules(model):
        assert not torch.equal(before[name][0], module.weight), name
        assert not torch.equal(before[name][1], module.centroids), name


def test_tau_schedules_by_their_formulas():
    """The schedules' values written out, not computed by the code under test: flat until the milestone, then
    linear or cosine from tau_start to tau_end over the remaining steps, tau_end after them."""
    assert [tau_at(s, 0, 4, "linear", 0.1, 0.02) for s in (0, 1, 2, 4, 9)] == pytest.approx(
        [0.1, 0.08, 0.06, 0.02, 0.02]
    )
    assert [tau_at(s, 2, 6, "linear", 0.1, 0.02) for s in (0, 2, 3, 6)] == pytest.approx([0.1, 0.1, 0.08, 0.02])
    cosine = [tau_at(s, 0, 4, "cosine", 0.1, 0.02) for s in range(5)]
    half = (2 + 2**0.5) / 4  # (1 + cos(pi / 4)) / 2
    assert cosine == pytest.approx([0.1, 0.02 + 0.08 * half, 0.06, 0.02 + 0.08 * (1 - half), 0.02])
    assert tau_at(3, 0, 4, "constant", 0.1, 0.02) == 0.1


def test_dkm_trainer_learns_logs_tau_and_hard_metrics(toy_path, tmp_path):
    model = _model(toy_path)
    args = _args(
        tmp_path,
        max_steps=30,
        tau_schedule="linear",
        tau_start=0.1,
        tau_end=0.025,
        eval_soft=True,
        eval_strategy="steps",
        eval_steps=30,
    )
    trainer = DKMTrainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(480),
        eval_dataset=ToyDataset(128, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 30
    taus = [entry["dkm_tau"] for entry in logs]
    assert taus == pytest.approx([0.1 - 0.075 * s / 30 for s in range(30)])  # linear from tau_start to tau_end
    assert all(math.isfinite(e["loss"]) for e in logs)
    assert sum(e["loss"] for e in logs[-5:]) < sum(e["loss"] for e in logs[:5])
    assert all("dkm_entropy" in e and "dkm_empty_clusters" in e for e in logs)
    # 12.12: no change or drift at the first logging step (nothing to compare with yet), then at every one
    assert "dkm_changed_fraction" not in logs[0] and "dkm_centroid_drift" not in logs[0]
    assert all(0 <= e["dkm_changed_fraction"] <= 1 and e["dkm_centroid_drift"] >= 0 for e in logs[1:])
    assert 0 < sum(e["dkm_centroid_drift"] for e in logs[1:])
    kept = trainer.dkm_callback._previous  # a bounded sample of assignments per module, not one byte per weight
    assert kept and all(t.numel() <= CHANGE_SAMPLE + 1 for t in kept.values())
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert evals and "eval_soft_accuracy" in evals[-1]
    assert evals[-1]["eval_accuracy"] > 0.6


def test_a_soft_evaluation_keeps_each_modules_own_soft_eval(toy_path, tmp_path):
    model = _model(toy_path)
    modules = [m for _, m in dkm_hf.dkm_modules(model)]
    modules[0].soft_eval = True  # the user's choice for one module
    trainer = DKMTrainer(model=model, args=_args(tmp_path, eval_soft=True), eval_dataset=ToyDataset(32))
    metrics = trainer.evaluate()
    assert "eval_soft_loss" in metrics and metrics["eval_soft_loss"] != metrics["eval_loss"]
    assert [m.soft_eval for m in modules] == [True] + [False] * (len(modules) - 1)


@pytest.mark.parametrize(("bits", "embedding_bits", "most"), [(3, 8, 0.05), (8, 3, 0.01)])
def test_logged_tau_with_mixed_bit_widths(toy_path, tmp_path, bits, embedding_bits, most):
    """tau=None gives each layer its width's tau: the log shows the one most layers use (the larger or the smaller)
    and the range."""
    model = _model(toy_path, tau=None, bits=bits, overrides={".*embeddings.*": {"bits": embedding_bits}})
    taus = [m.settings.tau for _, m in dkm_hf.dkm_modules(model)]
    assert sorted(set(taus)) == [0.01, 0.05] and taus.count(most) > len(taus) / 2
    args = _args(tmp_path, max_steps=2, tau_schedule="constant")
    trainer = DKMTrainer(model=model, args=args, train_dataset=ToyDataset(32))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [(e["dkm_tau"], e["dkm_tau_min"], e["dkm_tau_max"]) for e in logs] == [(most, 0.01, 0.05)] * 2


class _RecordTaus(TrainerCallback):
    """Every layer's tau during each step (the DKM callback sets it at the step's beginning)."""

    def __init__(self):
        self.taus: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.taus.append({n: m.settings.tau for n, m in dkm_hf.dkm_modules(model) if m.tied_source is None})


@pytest.mark.parametrize(
    ("options", "ratio_3_bits", "ratio_8_bits"),
    [({}, 0.1, 1.0), ({"tau_end_ratio": 0.5}, 0.5, 0.5)],
    ids=["default-ratio-by-bits", "tau_end_ratio"],
)
def test_tau_schedule_ends_at_a_fraction_of_each_layers_tau(toy_path, tmp_path, options, ratio_3_bits, ratio_8_bits):
    """By default each layer anneals (cosine) from its own tau to tau * ratio: 0.1 at <= 3 bits, flat above."""
    model = _model(toy_path, tau=None, overrides={".*embeddings.*": {"bits": 8}})
    bits = {n: m.layout.bits for n, m in dkm_hf.dkm_modules(model) if m.tied_source is None}
    assert sorted(set(bits.values())) == [3, 8]
    record = _RecordTaus()
    args = _args(tmp_path, max_steps=5, **options)  # the default schedule: cosine
    DKMTrainer(model=model, args=args, train_dataset=ToyDataset(80), callbacks=[record]).train()
    assert len(record.taus) == 5
    for name, b in bits.items():
        start, ratio = (0.05, ratio_3_bits) if b == 3 else (0.01, ratio_8_bits)
        expected = [tau_at(s, 0, 5, "cosine", start, start * ratio) for s in range(5)]
        assert [step[name] for step in record.taus] == pytest.approx(expected), name


def test_a_second_run_on_the_same_model_starts_from_the_configured_tau(toy_path, tmp_path):
    """The schedule moves settings.tau; the next trainer on the same model must not start from where it ended."""
    model = _model(toy_path, tau=None)
    runs = []
    for i in range(2):
        record = _RecordTaus()
        args = _args(tmp_path / str(i), max_steps=4)
        DKMTrainer(model=model, args=args, train_dataset=ToyDataset(64), callbacks=[record]).train()
        runs.append([next(iter(step.values())) for step in record.taus])
    expected = [tau_at(s, 0, 4, "cosine", 0.05, 0.005) for s in range(4)]
    assert runs[0] == pytest.approx(expected) and runs[1] == pytest.approx(expected)
    assert all(m.settings.configured_tau == 0.05 for _, m in dkm_hf.dkm_modules(model))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau_end": 0.01, "tau_end_ratio": 0.1}, "not both"),
        ({"tau_end_ratio": 0.0}, "tau_end_ratio must be a finite number > 0"),
        ({"tau_end": -1.0}, "tau_end must be a finite number > 0"),
        ({"tau_schedule": "exponential"}, "tau_schedule must be one of"),
    ],
)
def test_bad_tau_schedules_are_refused_by_arguments_and_callback(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **options)
    with pytest.raises(ValueError, match=message):
        DKMCallback(**options)


def test_milestone_trains_dense_then_clusters(toy_path, tmp_path):
    model = _model(toy_path)
    seen = []

    class Probe(torch.nn.Module):
        pass

    layer = dict(dkm_hf.dkm_modules(model))["bert.encoder.layer.0.intermediate.dense"]
    original = layer.clustered_weight

    def spy():
        w = original()
        seen.append(torch.unique(w.detach()).numel())
        return w

    layer.clustered_weight = spy
    trainer = DKMTrainer(model=model, args=_args(tmp_path, max_steps=6, dkm_milestone=3), train_dataset=ToyDataset(96))
    trainer.train()
    assert len(seen) == 6
    assert all(n > 1000 for n in seen[:3])  # dense weights: every value distinct
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["dkm_enabled"] for e in logs] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    model.eval()
    assert torch.unique(layer.hard_weight()).numel() <= 8


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_cluster_health_starts_with_the_milestone_centroids(toy_path, tmp_path):
    """Steps 1-2 train dense (milestone 2) and the centroids are made as step 3 begins: the log of step 2 has no
    cluster health (before: the entropy and empty clusters of centroids about to be replaced, here never made, with
    init=False), step 3's compares with nothing, step 4's with step 3's centroids."""
    model = dkm_hf.prepare(
        AutoModelForSequenceClassification.from_pretrained(toy_path), DKMConfig(**CONFIG, milestone=2), init=False
    )
    trainer = DKMTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=ToyDataset(64))
    centroids = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            centroids[state.global_step] = {n: m.centroids.clone() for n, m in dkm_hf.dkm_modules(model)}

    trainer.add_callback(Keep())
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert [logs[s]["dkm_enabled"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert not any(k in logs[s] for s in (1, 2) for k in ("dkm_entropy", "dkm_empty_clusters", "dkm_reseeded"))
    assert "dkm_entropy" in logs[3] and "dkm_changed_fraction" not in logs[3]
    drift = [(centroids[4][n] - centroids[3][n]).abs().mean().item() for n in centroids[4]]
    assert logs[4]["dkm_centroid_drift"] == pytest.approx(sum(drift) / len(drift), rel=1e-5)


@pytest.mark.parametrize("milestone", [0, 4, 2])
def test_resume_reproduces_the_loss_sequence(toy_path, tmp_path, milestone):
    """Resuming from checkpoint-4 equals the uninterrupted run, also when step 4 is the milestone (12.5: the
    centroids are initialised from the weights of that step, not taken stale from the checkpoint)."""

    def run(out, max_steps=8, resume=None):
        model = _model(toy_path, milestone=milestone)
        args = _args(tmp_path, output_dir=str(out), max_steps=8, save_strategy="steps", save_steps=4)
        trainer = DKMTrainer(model=model, args=args, train_dataset=ToyDataset(256))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "full")
    _, _ = run(tmp_path / "cut")
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    saved = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "train"
    resumed, resumed_model = run(tmp_path / "cut", resume=str(checkpoint))
    assert _losses(resumed)[4:] == _losses(full)[4:]
    # the cluster-health logs too: the first after the resume compares with checkpoint-4's step, as the run's does
    # (before: it had no dkm_changed_fraction / dkm_centroid_drift, the samples of the last log being lost)
    health = ("dkm_changed_fraction", "dkm_centroid_drift", "dkm_entropy", "dkm_reseeded")
    full_logs, resumed_logs = ([e for e in t.state.log_history if "loss" in e] for t in (full, resumed))
    for a, b in zip(full_logs[4:], resumed_logs[4:]):
        assert {k: a.get(k) for k in health} == {k: b.get(k) for k in health}, a["step"]
    assert all(k in full_logs[-1] for k in health)
    for (n, a), (_, b) in zip(dkm_hf.dkm_modules(full_model), dkm_hf.dkm_modules(resumed_model)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.centroids, b.centroids), n


@pytest.mark.parametrize(
    "cut", ["no trainer state", "trainer state cut short", "no weights", "weights cut short", "step not a count"]
)
def test_resume_true_skips_a_checkpoint_whose_save_did_not_finish(toy_path, tmp_path, caplog, cut):
    """A run killed while checkpoint-6 was being written: Trainer writes trainer_state.json last, so a checkpoint
    without a whole one (or without its weights) is incomplete. resume_from_checkpoint=True resumes from checkpoint-3,
    says which checkpoint it skipped and why, and continues as the uninterrupted run does."""

    class Steps(TrainerCallback):
        def __init__(self):
            self.run = []

        def on_step_end(self, args, state, control, **kwargs):
            self.run.append(state.global_step)

    def run(out, resume=None):
        args = _args(tmp_path, output_dir=str(out), max_steps=9, save_strategy="steps", save_steps=3)
        steps = Steps()
        trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(256), callbacks=[steps])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, steps.run

    full, _ = run(tmp_path / "full")
    for step in (6, 9):  # a run cut during the save of checkpoint-6
        for name in os.listdir(tmp_path / "full" / f"checkpoint-{step}"):
            if step == 9 or name in ("trainer_state.json", "model.safetensors"):
                os.remove(tmp_path / "full" / f"checkpoint-{step}" / name)
    os.rmdir(tmp_path / "full" / "checkpoint-9")
    incomplete = tmp_path / "full" / "checkpoint-6"
    state = json.dumps(full.state.log_history)
    if cut == "trainer state cut short":
        (incomplete / "trainer_state.json").write_text(state[: len(state) // 2])
    elif cut in ("no weights", "weights cut short"):
        (incomplete / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
        if cut == "weights cut short":  # a crash before the file reached the disk
            (incomplete / "model.safetensors").write_bytes(b"\x00" * 10)
    elif cut == "step not a count":
        (incomplete / "trainer_state.json").write_text(json.dumps({"global_step": "6"}))
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        resumed, steps = run(tmp_path / "full", resume=True)
    reason = {
        "no trainer state": "it has no trainer_state.json, the file Trainer writes last",
        "trainer state cut short": "its trainer_state.json, the file Trainer writes last, is cut short",
        "no weights": "it has no model weights",
        "weights cut short": "its weight files are missing or damaged (model.safetensors:",
        "step not a count": "its trainer_state.json is not a trainer state (global_step '6', not a step count)",
    }[cut]
    assert f"not resuming from {incomplete}: {reason}" in caplog.text
    assert steps == [4, 5, 6, 7, 8, 9]
    assert _losses(resumed) == _losses(full)  # steps 1-3 from checkpoint-3's trainer state, then the same steps


def test_resuming_from_a_palettized_or_incomplete_directory_says_what_is_wrong(toy_path, tmp_path):
    model = _model(toy_path)
    trainer = DKMTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=ToyDataset(64))
    trainer.save_model(str(tmp_path / "palettized"))
    with pytest.raises(ValueError, match=r"palettized.* is a palettized checkpoint .*not a training checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "palettized"))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True: no complete training checkpoint .* in "):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"cannot resume training from .*nowhere: it is not a directory"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))
    assert trainer.state.global_step == 0


def test_plain_trainer_with_callback_and_palettized_save(toy_path, tmp_path):
    model = _model(toy_path, milestone=2)
    callback = DKMCallback(tau_schedule="cosine", tau_start=0.1, tau_end=0.025)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, TrainingArguments, max_steps=6),
        train_dataset=ToyDataset(96),
        callbacks=[callback],
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["dkm_enabled"] for e in logs] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert logs[2]["dkm_tau"] == pytest.approx(0.1) and logs[-1]["dkm_tau"] < 0.0375

    dkm = DKMTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=ToyDataset(32))
    dkm.save_model(str(tmp_path / "final"))
    assert dkm_hf.dkm_modules(model)  # still trainable
    saved = json.loads((tmp_path / "final" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "palettized" and saved["modules"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    model.eval()
    batch = ToyDataset(8, seed=3)[:8]
    expected = dkm_hf.palettize(model)(input_ids=batch["input_ids"]).logits
    assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, expected)


def test_bf16_gradient_accumulation_and_checkpointing(toy_path, tmp_path):
    model = _model(toy_path)
    args = _args(tmp_path, max_steps=3, bf16=True, gradient_accumulation_steps=2, activation_checkpointing=True)
    trainer = DKMTrainer(model=model, args=args, train_dataset=ToyDataset(96))
    result = trainer.train()
    assert math.isfinite(result.training_loss)


def test_torch_compile_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="torch_compile"):
        _args(tmp_path, torch_compile=True)


def test_two_process_training_keeps_ranks_identical(toy_path, tmp_path):
    """torchrun, 2 ranks on gloo: identical weights and centroids on every rank after every step, one checkpoint,
    and the same model as one process with the same global batch, up to the order of float sums.

    That tolerance, in units of each weight's largest training update: SGD's update is linear in the gradient, and
    reordering a gradient element's sum over the batch's n = 16 x 12 token rows moves it by at most (n - 1) U times
    its terms' magnitudes, about 4 x 192 U = 4.6e-5 of the update over 4 steps (conftest.U); DKM's soft assignment
    (tau = 0.05 of the weights' variance) carries a weight's difference into the next steps' gradients amplified.
    Measured between 1 and 2 processes and between ATen / MKL / oneDNN kernels limited to SSE4 and their AVX2 builds
    (see test_distributed): at most 8.1e-5; the bound is 1e-3. On top of that, each step stores w - lr g in float32:
    two updates that differ by reordering can round to neighbouring floats, one ulp of w (<= 2 U |w|) per step
    (conftest.weight_rounding), which matters where a layer's update is small against its weights (a run on a loaded
    machine: 4.7e-10 = 2^-31, one ulp of a weight near 0.005, on a query layer whose largest update was 2.9e-7).
    Loss scaling or a rank on other data changes the update by its own size."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dist_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist, single = tmp_path / "dist", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, script, toy_path, str(dist), "8"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, script, toy_path, str(single), "16"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((dist / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and len(ranks[0]["per_step"]) == 4
    assert ranks[0]["per_step"] == ranks[1]["per_step"]
    one = json.loads((single / "rank0.json").read_text())
    initial = AutoModelForSequenceClassification.from_pretrained(toy_path).state_dict()
    for name, weight in one["weights"].items():
        weight = torch.tensor(weight)
        update = (weight - initial[f"{name}.weight"]).abs().max().item()
        assert update > 0, name
        rounding = weight_rounding(weight, len(ranks[0]["per_step"]))
        assert_within(ranks[0]["weights"][name], weight, 1e-3, update, name, rounding)
    assert sorted(p.name for p in dist.iterdir()) == ["final", "rank0.json", "rank1.json"]
    saved = sorted(p.name for p in (dist / "final").iterdir())
    assert saved.count("model.safetensors") == 1 and "config.json" in saved
    assert json.loads((dist / "final" / "config.json").read_text())["quantization_config"]["format"] == "palettized"


def test_dead_and_duplicate_centroids_are_reseeded():
    from torch import nn

    from dkm_hf.integrations.callback import reseed_dead_centroids

    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(bits=2, weight_threshold=0))
    layer = model[0]
    with torch.no_grad():
        layer.centroids[0, 1] = layer.centroids[0, 0]  # duplicate
        layer.centroids[0, 3] = 100.0  # far away: empty
    assert reseed_dead_centroids(layer.dkm_weights["weight"]) == 2
    sizes = torch.bincount(layer.assignments().view(-1), minlength=4)
    assert (sizes > 0).all() and torch.unique(layer.centroids).numel() == 4
    # a constant weight has one value for four centroids: nothing to re-seed them onto, and none is counted (before:
    # 3 "re-seeded" at every logging step, the centroids unchanged)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.centroids.fill_(0.5)
    assert reseed_dead_centroids(layer.dkm_weights["weight"]) == 0


def test_a_tied_weights_centroids_are_its_sources():
    """`centroids` of a tied weight (GPT-2's lm_head) raised a bare KeyError: they are the source's LUT."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0))
    states = dict(dkm_hf.dkm_modules(model))
    assert states["lm_head"].tied_source is states["transformer.wte"]
    assert states["lm_head"].centroids is states["transformer.wte"].centroids


def test_reseeding_of_an_importance_weighted_loop_takes_the_largest_weighted_error():
    """Where the loop is importance-weighted (`set_importance`), an empty centroid moves onto the vector of largest
    f (w - c)^2, not the largest (w - c)^2."""
    from torch import nn

    from dkm_hf.integrations.callback import reseed_dead_centroids

    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 1)), DKMConfig(bits=2, weight_threshold=0))
    state = model[0].dkm_weights["weight"]
    w = state.vectors()[0, :, 0]
    error = lambda: (w - state.centroids[0, state.assignments()[0], 0]).square()  # noqa: E731
    with torch.no_grad():
        state.centroids[0, 3] = 100.0  # far away: empty
    plain_pick = error().argmax()
    importance = torch.ones(64)
    importance[plain_pick] = 1e-6
    target = (error() * importance).argmax()
    assert target != plain_pick
    dkm_hf.set_importance(model, {"0": importance.view(1, 64)})
    assert reseed_dead_centroids(state) == 1
    assert state.centroids[0, 3, 0] == w[target]


def test_centroids_gone_non_finite_stop_training_before_a_checkpoint(toy_path, tmp_path):
    """A diverged step (here: one weight set to NaN before step 3, so every gradient is NaN) makes centroids NaN:
    training stops at the end of that step with an error naming a layer, and no checkpoint holding them is written."""
    poisoned = "bert.encoder.layer.0.intermediate.dense"

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.get_submodule(poisoned).weight[0, 0] = float("nan")

    out = tmp_path / "out"
    args = _args(tmp_path, output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=1)
    trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(96), callbacks=[Poison()])
    with pytest.raises(FloatingPointError, match=r"bert\.\S+\.centroids: \d+ value\(s\) became NaN .* at step 3"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("rows", [4, 512])
def test_cluster_health_entropy_is_measured_on_a_sample_of_groups_and_weights(rows, monkeypatch):
    """Per-row LUTs: the entropy is the mean over about HEALTH_SAMPLE weights taken across groups (not every weight of
    every row), each with its own group's tau; a small layer is measured whole."""
    from torch import nn

    from dkm_hf.integrations import callback
    from dkm_hf.ops.attention import attention

    torch.manual_seed(0)
    config = DKMConfig(bits=3, granularity="per_grouped_channel", group_size=1, weight_threshold=0)
    linear = nn.Linear(256, rows)
    with torch.no_grad():  # a constant row: its tau is the floor, set by the size of its centroids
        linear.weight[0] = 0.5
    model = dkm_hf.prepare(nn.Sequential(linear), config)
    state = model[0].dkm_weights["weight"]
    with torch.no_grad():
        state.centroids[0] = torch.linspace(0.2, 0.8, 8).view(8, 1)
    monkeypatch.setattr(callback, "HEALTH_SAMPLE", 1024)
    seen, taus = [], []
    monkeypatch.setattr(
        callback, "attention", lambda w, c, tau: seen.append(w.shape) or taus.append(tau) or attention(w, c, tau)
    )
    entropy = callback.cluster_health(state, state.assignments())["entropy"]
    assert seen[0][0] * seen[0][1] <= 1024
    vectors = state.vectors()
    tau, _ = state.temperature(vectors)
    assert torch.equal(taus[0].flatten(), tau[:: 1 if rows == 4 else 128])  # the loop's tau of the sampled groups
    a = attention(vectors, state.centroids, tau.view(-1, 1, 1))
    per_weight = -(a * a.clamp_min(1e-30).log()).sum(1)  # (G, n)
    if rows == 4:  # 4 x 256 weights: all of them
        assert seen[0] == (4, 256, 1) and entropy == pytest.approx(per_weight.mean().item(), rel=1e-5)
    else:  # every 128th row: within sampling error of the whole layer's mean entropy
        assert seen[0][0] == 4 and entropy == pytest.approx(per_weight[::128].mean().item(), rel=1e-5)


BEST_BY_LOSS = {
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_strategy": "steps",
    "save_steps": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "loss",
}


def test_checkpoint_zero_holds_no_optimizer_state_and_resumes_like_the_run(toy_path, tmp_path):
    """checkpoint-0 (the step-0 hard model as a best-model candidate) is written before any optimizer step: no
    optimizer or scheduler state is saved (under FSDP2, gathering the empty state ran a zero-gradient step that
    AdamW counted), and a run resumed from it equals the uninterrupted one."""

    def run(out, resume=None):
        args = _args(tmp_path, output_dir=str(out), max_steps=4, weight_decay=0.1, **BEST_BY_LOSS)
        trainer = DKMTrainer(
            model=_model(toy_path), args=args, train_dataset=ToyDataset(128), eval_dataset=ToyDataset(32, seed=1)
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    zero, two = tmp_path / "full" / "checkpoint-0", tmp_path / "full" / "checkpoint-2"
    assert zero.is_dir() and not {"optimizer.pt", "scheduler.pt"} & set(os.listdir(zero))
    assert {"optimizer.pt", "scheduler.pt"} <= set(os.listdir(two))
    assert torch.load(two / "optimizer.pt", weights_only=True)["state"][0]["step"].item() == 2
    resumed = run(tmp_path / "full", resume=str(zero))
    assert _losses(resumed) == _losses(full)


def test_evaluation_before_the_milestone_measures_the_hard_model(toy_path, tmp_path):
    """Before the DKM milestone training runs on the dense weights, but an evaluation measures the hard model (the
    weights on their centroids: what save_model ships at that point), so the best-model rule never picks a dense
    score; clustering stays off in training until the milestone."""
    model = _model(toy_path, bits=1)
    dense = AutoModelForSequenceClassification.from_pretrained(toy_path).eval()
    eval_set = ToyDataset(32, seed=1)
    hard = Trainer(model=model, args=_args(tmp_path, TrainingArguments)).evaluate(eval_set)["eval_loss"]
    plain = Trainer(model=dense, args=_args(tmp_path, TrainingArguments)).evaluate(eval_set)["eval_loss"]
    assert abs(hard - plain) > 1e-3  # 1-bit clustering changes the loss: the two are told apart
    args = _args(tmp_path, max_steps=4, dkm_milestone=3, learning_rate=0.0, **BEST_BY_LOSS)
    trainer = DKMTrainer(model=model, args=args, train_dataset=ToyDataset(128), eval_dataset=eval_set)
    trainer.train()
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert evals[:2] == pytest.approx([hard, hard], rel=1e-6)  # steps 0 and 2: before the milestone, hard
    assert [e["dkm_enabled"] for e in trainer.state.log_history if "loss" in e] == [0.0, 0.0, 0.0, 1.0]


def test_resuming_into_a_model_of_another_dkm_config_is_refused(toy_path, tmp_path):
    """A checkpoint's centroids only fit the DKMConfig it was trained with: other per-channel scales, bit widths or
    clustered weights are refused before training, naming the tensors (before: transformers' missing / unexpected
    key warnings, then training on mismatched centroids)."""
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(64)).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    for overrides, message in (
        ({"per_channel_scale": True}, "weight_scale"),
        ({"bits": 2}, "expected a float tensor of shape"),
        ({"weight_threshold": 5000}, "centroids of .* weight.*not cluster"),
    ):
        trainer = DKMTrainer(model=_model(toy_path, **overrides), args=args, train_dataset=ToyDataset(64))
        with pytest.raises(ValueError, match=f"cannot resume training from .*checkpoint-2: .*{message}"):
            trainer.train(resume_from_checkpoint=checkpoint)
    DKMTrainer(model=_model(toy_path, per_channel_scale=False), args=_args(tmp_path, max_steps=3),
               train_dataset=ToyDataset(64)).train(resume_from_checkpoint=checkpoint)  # fmt: skip


def test_the_resume_check_reads_a_wrapped_model_by_its_own_names(toy_path, tmp_path):
    """A SentenceTransformer saves its transformer's weights under that model's own names: the resume check compares
    them with the wrapped model's DKM weights (before: every centroid "not clustered by config.json", so a resume of
    `DKMTrainerMixin` on SentenceTransformerTrainer was always refused)."""
    from dkm_hf.integrations.resume import model_problem

    _model(toy_path).save_pretrained(tmp_path / "checkpoint")
    wrap = lambda model: torch.nn.Sequential(torch.nn.ModuleDict({"auto_model": model}))  # noqa: E731
    assert model_problem(tmp_path / "checkpoint", wrap(_model(toy_path))) is None
    problem = model_problem(tmp_path / "checkpoint", wrap(_model(toy_path, bits=2)))
    assert "expected a float tensor of shape" in problem


def test_a_module_wrapping_a_dkm_model_is_refused_naming_what_to_use(toy_path, tmp_path):
    """Trainer saves a plain module as a bare state dict, which DKMTrainer could neither resume (no config.json) nor
    save palettized for any loader: refused naming the wrapped DKM model and the plain Trainer with DKMCallback."""

    class Head(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone, self.head = backbone, torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"holds one \('backbone'\).*DKMCallback.*palettize\(model.backbone\)"):
        DKMTrainer(model=Head(_model(toy_path)), args=_args(tmp_path), train_dataset=ToyDataset(8))


def test_a_checkpoint_without_a_clustered_weight_is_refused(toy_path, tmp_path):
    """Transformers loads a checkpoint that lacks a weight with a warning and keeps the model's starting value: the
    resume check names the missing clustered weight instead."""
    from safetensors.torch import load_file, save_file

    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(64)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    tensors = load_file(checkpoint / "model.safetensors")
    with open(checkpoint / "model.safetensors", "rb") as f:
        metadata = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__")
    name, _ = dkm_hf.dkm_modules(_model(toy_path))[1]
    del tensors[f"{name}.weight"]
    save_file(tensors, checkpoint / "model.safetensors", metadata=metadata)
    trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(64))
    with pytest.raises(ValueError, match=f"lacks the clustered weight.*{name}.weight"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_cluster_health_follows_a_logging_ratio(toy_path, tmp_path):
    """logging_steps=0.5 of 8 steps logs at steps 4 and 8, as logging_steps=4: cluster health and re-seeding run at
    those steps only (before: every step, the changed fraction measured over one step)."""
    logs = []
    for every in (0.5, 4):
        trainer = DKMTrainer(
            model=_model(toy_path),
            args=_args(tmp_path, max_steps=8, logging_steps=every),
            train_dataset=ToyDataset(256),
        )
        trainer.train()
        logs.append([e for e in trainer.state.log_history if "loss" in e])
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == [4, 8]
    for a, b in zip(*logs):
        assert a["dkm_changed_fraction" if "dkm_changed_fraction" in a else "dkm_entropy"] == pytest.approx(
            b.get("dkm_changed_fraction", b["dkm_entropy"]), rel=1e-6
        )


def test_a_milestone_past_the_last_step_is_warned(toy_path, tmp_path, caplog):
    hf_logging.enable_propagation()
    trainer = DKMTrainer(
        model=_model(toy_path), args=_args(tmp_path, max_steps=2, dkm_milestone=5), train_dataset=ToyDataset(64)
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "milestone (5) is at or past the run's last step (2)" in caplog.text


def test_two_process_distillation_logs_the_global_batchs_terms(toy_path, tmp_path):
    """torchrun, 2 ranks of 8 against one process of 16: the logged distill_task_loss / distill_kl /
    distill_hidden_mse are the global batch's token-weighted means, as the loss is (before: rank 0's half only, its
    KL 1e-3 of the whole's at the last step). Equal up to float reordering of the sums (rel 1e-4, as the loss)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dist_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist, single = tmp_path / "dist", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    for command in ([*cmd, script, toy_path, str(dist), "8", "distill"], [sys.executable, script, toy_path,
                                                                           str(single), "16", "distill"]):  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((dist / "rank0.json").read_text())["logs"]
    one = json.loads((single / "rank0.json").read_text())["logs"]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "distill_task_loss", "distill_kl", "distill_hidden_mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key


def test_weights_an_optimizer_step_made_non_finite_stop_training_before_the_checkpoint(toy_path, tmp_path):
    """A NaN gradient in step 2's update writes NaN into a weight while step 2's centroids (from its forward) are
    finite: the check of the centroids alone let checkpoint-2 be saved with the NaN weight, and the run stopped a
    step later, its message pointing at that checkpoint. Before a save the weights are checked too."""
    layer = "bert.encoder.layer.0.intermediate.dense"

    class Diverge(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the update of step 2
                model.get_submodule(layer).weight.grad[0, 0] = float("nan")

    out = tmp_path / "out"
    args = _args(tmp_path, output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=1, max_grad_norm=0)
    trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(96), callbacks=[Diverge()])
    with pytest.raises(FloatingPointError, match=rf"{layer}: 1 value\(s\) became NaN .* at step 2"):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


def test_dkm_metrics_reach_the_reporting_integrations_once_each(toy_path, tmp_path):
    """Trainer lists the reporting integrations (TensorBoard, W&B) before a user's callbacks, and each consumes the
    log when it comes: with a plain Trainer and DKMCallback they never saw a dkm_* metric. And a value set once
    (the teacher's size) was logged again at every later log."""

    class Integration(TrainerCallback):  # what a reporting integration sees, placed where Trainer puts them
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    for trainer_cls in (Trainer, DKMTrainer):
        kwargs = {"callbacks": [DKMCallback()]} if trainer_cls is Trainer else {"teacher_model": _model(toy_path)}
        args = _args(tmp_path, TrainingArguments if trainer_cls is Trainer else DKMTrainingArguments, max_steps=4)
        trainer = trainer_cls(model=_model(toy_path), args=args, train_dataset=ToyDataset(64), **kwargs)
        integration = Integration()
        trainer.callback_handler.callbacks.insert(0, integration)
        trainer.train()
        training = [logs for logs in integration.seen if "loss" in logs]
        assert len(training) == 4
        assert all({"dkm_tau", "dkm_enabled", "dkm_entropy"} <= set(logs) for logs in training), trainer_cls
        if trainer_cls is DKMTrainer:
            assert ["dkm_teacher_mb" in logs for logs in training] == [True, False, False, False]
            assert all("distill_kl" in logs for logs in training)


def test_torch_compile_in_plain_arguments_is_refused_too(toy_path, tmp_path):
    """DKMTrainingArguments refuse torch_compile=True; plain TrainingArguments (or TRL's SFTConfig) given to the
    trainer carried it through, and the compiled run moved the centroids 1.4-2.3x more than the eager one."""
    args = _args(tmp_path, TrainingArguments, torch_compile=True)
    with pytest.raises(ValueError, match="torch_compile=True is not supported with DKM"):
        DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(16))


def test_the_mixin_passes_evaluate_keyword_arguments_on(toy_path, tmp_path):
    """Seq2SeqTrainer.evaluate takes generation settings (max_new_tokens, num_beams) as keyword arguments; the
    mixin's evaluate refused them with a TypeError."""

    class Generating(Trainer):
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):
            self.gen_kwargs = gen_kwargs
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    class DKMGenerating(dkm_hf.DKMTrainerMixin, Generating):
        pass

    args = _args(tmp_path, eval_strategy="no")
    trainer = DKMGenerating(model=_model(toy_path), args=args, eval_dataset=ToyDataset(16))
    metrics = trainer.evaluate(max_new_tokens=3, num_beams=2)
    assert trainer.gen_kwargs == {"max_new_tokens": 3, "num_beams": 2} and math.isfinite(metrics["eval_loss"])


def test_a_resume_does_not_evaluate_its_starting_step_again(toy_path, tmp_path):
    """eval_hard_on_start turns Trainer's eval_on_start on; a resume from checkpoint-2 then evaluated step 2 again
    (evaluations at 0, 2, 2, 4), paying a whole evaluation per resume."""

    def run(resume=None):
        args = _args(
            tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
            per_device_eval_batch_size=16,
        )  # fmt: skip
        trainer = DKMTrainer(
            model=_model(toy_path), args=args, train_dataset=ToyDataset(64), eval_dataset=ToyDataset(32)
        )
        trainer.train(resume_from_checkpoint=resume)
        return [e["step"] for e in trainer.state.log_history if "eval_loss" in e]

    assert run() == [0, 2, 4]
    assert run(str(tmp_path / "out" / "checkpoint-2")) == [0, 2, 4]


def test_an_epoch_strategy_save_checks_the_weights_too(toy_path, tmp_path):
    """Epoch strategies decide to save at the end of the epoch, after the step's checks: a NaN the optimizer wrote
    in the epoch's last step went into that epoch's checkpoint."""
    layer = "bert.encoder.layer.0.intermediate.dense"

    class Diverge(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:  # the update of step 4, the epoch's last
                model.get_submodule(layer).weight.grad[0, 0] = float("nan")

    out = tmp_path / "out"
    args = _args(tmp_path, output_dir=str(out), max_steps=8, save_strategy="epoch", max_grad_norm=0)
    trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(64), callbacks=[Diverge()])
    with pytest.raises(FloatingPointError, match=rf"{layer}: 1 value\(s\) became NaN .* at step 4"):
        trainer.train()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("reseed", [False, True])
def test_cluster_health_values_by_construction(reseed):
    """The health metrics' values on a layer built for them: one centroid far from every weight is one empty
    cluster (re-seeded onto a weight when re-seeding is on, then no longer empty); without a step in between nothing
    changes; moving one centroid of k by d moves the mean absolute drift by d / k and changes exactly the
    assignments that `assignments()` says."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = dkm_hf.prepare(torch.nn.Sequential(torch.nn.Linear(64, 32)), DKMConfig(bits=3, weight_threshold=0))
    (_, module), k = dkm_hf.dkm_modules(model)[0], 8
    with torch.no_grad():
        module.centroids[0, 3] = 100.0  # no weight is nearest to it
    callback = DKMCallback(log_cluster_health=True, reseed_dead_centroids=reseed)
    args, state = SimpleNamespace(logging_steps=1), SimpleNamespace(global_step=1, max_steps=10)

    def check(step):
        state.global_step = step
        callback.pending.clear()
        callback._health(args, state, model, logging=True)
        return callback.pending

    logs = check(1)
    assert logs["dkm_empty_clusters"] == 1 and logs["dkm_reseeded"] == (1 if reseed else 0)
    assert "dkm_changed_fraction" not in logs
    assert (module.centroids[0, 3, 0] == 100.0) != reseed  # re-seeded onto a weight
    before = module.assignments().clone()
    logs = check(2)  # no step in between: nothing changed (the re-seeding's moves were counted in dkm_reseeded)
    assert logs["dkm_empty_clusters"] == (0 if reseed else 1) and logs["dkm_reseeded"] == 0
    assert logs["dkm_centroid_drift"] == 0 and logs["dkm_changed_fraction"] == 0
    logs = check(3)
    assert logs["dkm_changed_fraction"] == 0 and logs["dkm_centroid_drift"] == 0
    with torch.no_grad():
        module.centroids[0, 5] += 0.25
    after = module.assignments()
    assert not torch.equal(after, before)  # the move changes some assignments
    logs = check(4)
    assert logs["dkm_centroid_drift"] == pytest.approx(0.25 / k)
    assert logs["dkm_changed_fraction"] == pytest.approx((after != before).float().mean().item())
    # without the health logs the re-seeding keeps its pace, and nothing is logged
    callback = DKMCallback(log_cluster_health=False, reseed_dead_centroids=reseed)
    with torch.no_grad():
        module.centroids[0, 3] = 100.0
    assert check(5) == {} and (module.centroids[0, 3, 0] == 100.0) != reseed


def test_cluster_health_at_every_step_that_logs(toy_path, tmp_path):
    """Trainer's own logging decides: each epoch's end (logging_strategy="epoch") and the first step
    (logging_first_step) carry the health values, the changed fraction from the second log on (before: only steps
    that were multiples of logging_steps, 500 by default for the epoch strategy, and the last step)."""
    runs = {
        "epoch": {"logging_strategy": "epoch", "logging_steps": 500, "num_train_epochs": 3, "max_steps": -1},
        "first": {"logging_first_step": True, "logging_steps": 4, "max_steps": 8},
    }
    for name, options in runs.items():
        trainer = DKMTrainer(
            model=_model(toy_path), args=_args(tmp_path / name, **options), train_dataset=ToyDataset(64)
        )
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        assert [e["step"] for e in logs] == ([4, 8, 12] if name == "epoch" else [1, 4, 8])
        assert all("dkm_entropy" in e and "dkm_reseeded" in e for e in logs), name
        assert ["dkm_changed_fraction" in e for e in logs] == [False, True, True], name


class _MeanLossTrainer(Trainer):
    """A subclass with its own loss, as transformers asks: a micro-batch mean, which Trainer divides by the
    accumulation steps (`loss_is_scaled_for_ga = False`)."""

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


class _TokenSumTrainer(Trainer):
    """Its loss normalised over the accumulated batch by Trainer's count (`loss_is_scaled_for_ga = True`)."""

    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("base", [_MeanLossTrainer, _TokenSumTrainer])
def test_the_mixin_keeps_a_subclass_loss_as_it_states(toy_path, tmp_path, base):
    """A Trainer subclass stating `loss_is_scaled_for_ga` computes its loss with the count, and one global batch
    gives the same update for 1 x 16 and 2 x 8 (before: a mean loss was scaled twice, half the update; a loss
    normalised by the count failed, the count not passed on)."""

    class Mixed(dkm_hf.DKMTrainerMixin, base):
        pass

    updates = []
    for accumulation in (1, 2):
        model = _model(toy_path, milestone=100)  # the dense phase: one gradient for either split
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = _args(
            tmp_path / f"{accumulation}",
            max_steps=1,
            per_device_train_batch_size=16 // accumulation,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0,
        )
        Mixed(model=model, args=args, train_dataset=ToyDataset(16)).train()
        updates.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()]))
    assert updates[0].abs().sum() > 0
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-6)


def test_a_dkm_trainer_leaves_the_callers_arguments_and_callbacks_alone(toy_path, tmp_path):
    """Step 0's hard evaluation is set on the trainer's own copy of the arguments (before: on the caller's, so a
    control run sharing them evaluated at step 0 too), and a DKMCallback passed in is refused by name (before: two
    ran, and the arguments' tau schedule overrode the user's)."""
    args = _args(tmp_path, eval_strategy="steps", eval_steps=4)
    trainer = DKMTrainer(model=_model(toy_path), args=args, train_dataset=ToyDataset(32), eval_dataset=ToyDataset(16))
    args.max_steps = 4  # changed after the trainer was built, as with a plain Trainer: it applies
    trainer.train()
    evaluated = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert trainer.args is args and evaluated == [0, 4] and not args.eval_on_start
    with pytest.raises(ValueError, match="adds its own DKMCallback"):
        DKMTrainer(
            model=_model(toy_path), args=_args(tmp_path), train_dataset=ToyDataset(32), callbacks=[DKMCallback()]
        )


def test_labels_that_are_not_a_tensor_train_as_in_trainer(tmp_path):
    """Detection models' labels are a list of dicts per image (DETR, YOLOS): DKMTrainer counted them with
    `.ne(-100)` and failed at the first step; Trainer trains them, and so does DKMTrainer now (the model's loss)."""

    class Boxes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 4)

        def forward(self, x, labels, **kwargs):  # **kwargs: Trainer counts the labels for such a forward
            boxes = self.proj(x)
            target = torch.stack([label["boxes"] for label in labels])
            return {"loss": torch.nn.functional.mse_loss(boxes, target), "logits": boxes}

    def collate(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "labels": [{"boxes": r["boxes"]} for r in rows]}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(16, generator=g), "boxes": torch.rand(4, generator=g)} for _ in range(8)]
    losses = {}
    for cls in (Trainer, DKMTrainer):
        torch.manual_seed(0)
        model = dkm_hf.prepare(Boxes(), DKMConfig(bits=4, weight_threshold=0))
        args = _args(tmp_path / cls.__name__, max_steps=3, per_device_train_batch_size=4, remove_unused_columns=False)
        trainer = cls(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.train()
        losses[cls] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses[DKMTrainer]) == 3 and all(math.isfinite(x) for x in losses[DKMTrainer])
    assert losses[DKMTrainer] == losses[Trainer]


@pytest.mark.parametrize("with_config", [False, True])
def test_a_model_built_in_code_resumes_and_saves_a_palettized_state_dict(tmp_path, with_config):
    """Trainer saves a model that is no PreTrainedModel as a bare state dict, without config.json: DKMTrainer refused
    every resume of one ("no readable config.json"), also for a module that copies its backbone's `config`. It resumes
    to the losses of the uninterrupted run now, a resume with other bits is refused, and save_model's palettized state
    dict loads into the same model palettized."""
    from safetensors.torch import load_file
    from transformers import BertConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
            if with_config:  # a head of one's own that copies its backbone's config
                self.config = BertConfig()

        def forward(self, x, labels=None):
            y = self.proj(self.a(x))
            return {"logits": y} if labels is None else {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(16, generator=g), "labels": torch.rand(4, generator=g)} for _ in range(32)]

    class LoggingTrainer(DKMTrainer):  # a subclass that adds to Trainer's save, which still writes a bare state dict
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)

    def run(resume=None, trainer_class=DKMTrainer, **config):
        torch.manual_seed(0)
        model = dkm_hf.prepare(Net(), DKMConfig(**{"bits": 4, "weight_threshold": 0, **config}))
        args = _args(tmp_path, max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
        trainer = trainer_class(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    trainer, losses = run()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    assert not (tmp_path / "out" / "checkpoint-2" / "config.json").exists()
    assert run(resume=checkpoint)[1] == losses
    assert run(resume=checkpoint, trainer_class=LoggingTrainer)[1] == losses
    # a DKM state the model does not have is refused, as for a training checkpoint with config.json
    for config, error in [
        ({"bits": 2}, r"a\.centroids: F32 of shape \[1, 16, 1\], expected"),
        ({"per_channel_scale": True}, r"without the DKM state of 2 tensor\(s\), e\.g\. \['a\.weight_scale'"),
        ({"modules_to_not_convert": ["proj"]}, r"centroids of 1 weight\(s\) .* e\.g\. \['proj\.centroids'\]"),
    ]:
        with pytest.raises(ValueError, match="checkpoint-2: its DKM state does not fit .*" + error):
            run(resume=checkpoint, **config)

    trainer.save_model(str(tmp_path / "final"))
    torch.manual_seed(0)
    shipped = dkm_hf.palettize(dkm_hf.prepare(Net(), DKMConfig(bits=4, weight_threshold=0)))
    shipped.load_state_dict(load_file(tmp_path / "final" / "model.safetensors"))
    x = torch.stack([row["x"] for row in data])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(shipped(x)["logits"], trainer.model(x)["logits"])


# Behaviours of dkm_hf/integrations/trainer.py no other test pinned (a mutation review)


def _plain_args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "save_strategy": "no",
    }
    return DKMTrainingArguments(**{**base, **kw})


class _ItemClassifier(nn.Module):
    """A classifier whose forward takes **kwargs (Trainer then counts num_items_in_batch) and whose loss ignores
    labels of -100 (so a micro-batch without a labelled item has a nan mean)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 4)

    def forward(self, x, labels=None, **kwargs):
        logits = self.proj(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _item_data(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(16, generator=g), "labels": torch.tensor(i % 4)} for i in range(n)]


def test_distill_temperature_zero_is_refused(tmp_path):
    """A distillation temperature of 0 (which would divide the logits by zero) is refused; any positive one is not."""
    with pytest.raises(ValueError, match="distill_temperature must be > 0"):
        _plain_args(tmp_path, distill_temperature=0.0)
    _plain_args(tmp_path, distill_temperature=1e-3)  # any positive one is fine


def test_teacher_and_compute_loss_func_together_are_refused(tmp_path):
    """teacher_model and compute_loss_func both define the training loss: given together they are refused (the
    distillation loss would silently ignore the user's function)."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(_ItemClassifier(), DKMConfig(bits=2, weight_threshold=0))
    teacher = _ItemClassifier()
    with pytest.raises(ValueError, match="teacher_model and compute_loss_func both define the training loss"):
        DKMTrainer(
            model=model,
            args=_plain_args(tmp_path),
            train_dataset=_item_data(),
            teacher_model=teacher,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs["loss"],
        )


def test_a_micro_batch_without_labelled_items_adds_nothing_to_the_step(tmp_path):
    """A micro-batch whose labels are all -100 has a nan mean: its share of the accumulated step (0) is exactly 0, not
    nan; a labelled one gives its mean times its share of the step's items."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(_ItemClassifier(), DKMConfig(bits=2, weight_threshold=0))
    trainer = DKMTrainer(model=model, args=_plain_args(tmp_path), train_dataset=_item_data())
    assert trainer.model_accepts_loss_kwargs
    model.train()
    unlabelled = {"x": torch.randn(4, 16), "labels": torch.full((4,), -100)}
    loss = trainer.compute_loss(model, unlabelled, num_items_in_batch=torch.tensor(8))
    assert torch.isfinite(loss) and loss.item() == 0.0
    labelled = {"x": torch.randn(4, 16), "labels": torch.tensor([0, 1, 2, 3])}
    loss = trainer.compute_loss(model, labelled, num_items_in_batch=torch.tensor(8))
    mean = F.cross_entropy(model(labelled["x"])["logits"], labelled["labels"])
    torch.testing.assert_close(loss, mean * 4 / 8)  # the micro-batch's share of the step's 8 items


def test_a_subclass_stating_its_loss_is_scaled_gets_the_distillation_loss_as_its_share(tmp_path):
    """With a teacher, a Trainer subclass stating `loss_is_scaled_for_ga = True` (Trainer then leaves the loss
    undivided) gets the distillation loss as the micro-batch's share of the accumulated batch, not its mean
    (`accumulation` times too large a step)."""
    from transformers import Trainer
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Net(_ItemClassifier):
        def forward(self, x, labels=None, **kwargs):
            logits = self.proj(x)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    class Stated(Trainer):
        loss_is_scaled_for_ga = True

    class Mixed(dkm_hf.DKMTrainerMixin, Stated):
        pass

    torch.manual_seed(0)
    teacher = Net()
    model = dkm_hf.prepare(copy.deepcopy(teacher), DKMConfig(bits=2, weight_threshold=0))
    trainer = Mixed(model=model, args=_plain_args(tmp_path), train_dataset=_item_data(), teacher_model=teacher)
    model.train()
    inputs = {"x": torch.randn(4, 16), "labels": torch.tensor([0, 1, 2, 3])}
    whole = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(4))  # the step's only micro-batch
    half = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(8))  # half of the step's items
    assert whole.item() > 0
    torch.testing.assert_close(half, whole / 2)


def test_step_zero_best_model_with_a_dict_of_eval_datasets(tmp_path):
    """With a dict of eval datasets Trainer calls evaluate once per dataset with its partial metrics; the step-0
    best-model check runs on the merged ones only (metric_for_best_model, of another dataset, is missing from the
    partial ones). test_trl's two-eval-sets case covers this where trl is installed; this one needs no trl."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(_ItemClassifier(), DKMConfig(bits=2, weight_threshold=0))
    args = _plain_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_b_loss",
        greater_is_better=False,
    )
    evals = {"a": _item_data(4), "b": _item_data(8)}
    trainer = DKMTrainer(model=model, args=args, train_dataset=_item_data(), eval_dataset=evals)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_b_loss" in e]
    assert [e["step"] for e in logged] == [0, 2]
    assert trainer.state.best_model_checkpoint is not None
