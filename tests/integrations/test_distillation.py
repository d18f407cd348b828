"""Distillation from the dense model (`DKMTrainer(teacher_model=...)`) and the best hard model kept over training."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import AUTO, U, assert_within, first_step_change, tiny_inputs
from torch import nn
from toy import ToyDataset, accuracy, save_toy_bert
from transformers import AutoModelForSequenceClassification

import dkm_hf
from dkm_hf import DKMConfig, DKMTrainer, DKMTrainingArguments
from dkm_hf.integrations.distillation import distilled_loss, hidden_term, kl_term

# Evaluate and checkpoint every 3 steps (and at step 0), keep the best model by eval loss.
BEST_BY_LOSS = {
    "eval_strategy": "steps",
    "eval_steps": 3,
    "save_strategy": "steps",
    "save_steps": 3,
    "load_best_model_at_end": True,
    "metric_for_best_model": "loss",
}


def _args(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "max_steps": 6,
    }
    return DKMTrainingArguments(**{**base, **kw})


def test_kl_term_is_zero_for_equal_logits_and_masks_tokens():
    logits = torch.randn(2, 5, 7)
    assert kl_term(logits, logits, 2.0, None).item() == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[:, -1, 0] += 10  # only the last token's distribution differs
    mask = torch.ones(2, 5)
    assert kl_term(other, logits, 2.0, mask).item() > 0
    mask[:, -1] = 0
    assert kl_term(other, logits, 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    manual = 4.0 * torch.nn.functional.kl_div(
        torch.log_softmax(other[0, -1] / 2, -1),
        torch.log_softmax(logits[0, -1] / 2, -1),
        log_target=True,
        reduction="sum",
    )
    assert kl_term(other[:1, -1], logits[:1, -1], 2.0, None).item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_a_seq2seq_teacher_decodes_the_labels_as_the_student_does(arch):
    """Trained the standard way (input_ids + labels: the model makes its decoder inputs from the labels), the
    teacher had no decoder inputs: T5 raised, BART decoded shift_right(input_ids) and the KL compared other texts."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from dkm_hf.integrations.distillation import distilled_loss

    common = {"vocab_size": 99, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    torch.manual_seed(0)
    if arch == "t5":
        config = T5Config(d_model=32, d_ff=40, d_kv=8, num_layers=1, num_heads=4, dropout_rate=0.0, **common)
        model = T5ForConditionalGeneration(config).eval()
    else:
        config = BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0, **common,
        )  # fmt: skip
        model = BartForConditionalGeneration(config).eval()
    inputs = {"input_ids": torch.randint(3, 99, (2, 7)), "labels": torch.randint(3, 99, (2, 5))}
    with torch.no_grad():  # the teacher is the student: the KL is zero where both decode the labels
        loss, outputs, terms = distilled_loss(model, model, inputs, 1.0, 1.0, 0.0, inputs["labels"].ne(-100), False)
    assert terms["distill_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert outputs.logits.shape[:2] == (2, 5)


def test_a_plain_module_teacher_distils(tmp_path):
    """A teacher without a transformers config (any nn.Module returning logits) trains as before."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def forward(self, x, labels=None, **kwargs):
            logits = self.layer(x)
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    torch.manual_seed(0)
    teacher = Net()
    student = dkm_hf.prepare(copy.deepcopy(teacher), DKMConfig(bits=2, weight_threshold=0))
    data = [{"x": torch.randn(8), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = _args(tmp_path, max_steps=2, remove_unused_columns=False, distill_alpha=0.5)
    trainer = DKMTrainer(model=student, args=args, train_dataset=data, teacher_model=teacher)
    trainer.train()
    assert all(math.isfinite(e["distill_kl"]) for e in trainer.state.log_history if "loss" in e)


def test_distillation_without_tensor_labels_is_refused_by_name(tmp_path):
    """Question answering's start / end positions (no `labels`) fell through to the plain loss: the teacher was
    ignored silently while `dkm_teacher_mb` was logged."""
    path = save_toy_bert(tmp_path / "bert")
    teacher = AutoModelForSequenceClassification.from_pretrained(path)
    student = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=DKMConfig(bits=2))
    data = [{k: v for k, v in row.items() if k != "labels"} for row in ToyDataset(8)]
    trainer = DKMTrainer(model=student, args=_args(tmp_path), train_dataset=data, teacher_model=teacher)
    with pytest.raises(ValueError, match=r"needs a tensor of labels in every training batch; this batch has \["):
        trainer.train()


@pytest.mark.parametrize("hidden", [0.0, 0.5])
def test_sequence_classification_with_a_teacher(tmp_path, hidden):
    path = save_toy_bert(tmp_path / "bert")
    teacher = AutoModelForSequenceClassification.from_pretrained(path)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = AutoModelForSequenceClassification.from_pretrained(
        path, dkm_config=DKMConfig(bits=2, weight_threshold=1000)
    )
    args = _args(tmp_path, distill_alpha=0.7, distill_temperature=3.0, distill_hidden_weight=hidden)
    trainer = DKMTrainer(model=student, args=args, train_dataset=ToyDataset(64), teacher_model=teacher)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(e["distill_kl"]) and e["distill_kl"] >= 0 for e in logs)
    assert ("distill_hidden_mse" in logs[-1]) == (hidden > 0)
    assert logs[0]["dkm_teacher_mb"] > 0
    # the loss is the mix of the task loss and the KL (and the hidden-state term)
    last = logs[-1]
    mix = 0.3 * last["distill_task_loss"] + 0.7 * last["distill_kl"] + hidden * last.get("distill_hidden_mse", 0.0)
    assert last["loss"] == pytest.approx(mix, rel=1e-3)
    assert not trainer.teacher.training and all(not p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())


def test_causal_lm_teacher_follows_the_student_dtype(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    student = AUTO["llama"].from_pretrained(path, dtype=torch.bfloat16, dkm_config=DKMConfig(bits=3))
    ids = tiny_inputs("llama", batch=8)["input_ids"]
    data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    trainer = DKMTrainer(
        model=student,
        args=_args(tmp_path, max_steps=2),
        train_dataset=data,
        teacher_model=AUTO["llama"].from_pretrained(path),
    )
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    trainer.train()
    assert all(math.isfinite(e["distill_kl"]) for e in trainer.state.log_history if "loss" in e)


def test_best_hard_model_never_worse_than_post_training(tmp_path):
    """eval starts at step 0 (the hard model is then post-training k-means); a run that only gets worse ends, with
    load_best_model_at_end, on exactly that model."""
    path = save_toy_bert(tmp_path / "bert")
    config = DKMConfig(bits=2, weight_threshold=1000)
    model = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=config)
    post_training = copy.deepcopy(model).eval()
    args = _args(
        tmp_path,
        learning_rate=5.0,  # ruins the model
        **BEST_BY_LOSS,
    )
    trainer = DKMTrainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(64),
        eval_dataset=ToyDataset(32, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evals[0]["step"] == 0 and len(evals) >= 3
    assert min(e["eval_loss"] for e in evals[1:]) > evals[0]["eval_loss"]  # training made it worse
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-0")
    x = ToyDataset(8, seed=2)[:8]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, post_training(x).logits)


def _best_model_run(path, out, margin: float = 0.0, every: int = 3):
    """Nine steps of a 2-bit toy BERT, evaluated and checkpointed at step 0 and every `every` steps, the best model by
    eval loss loaded at the end. Returns the trainer state, the eval loss by step, and whether the model it ended with
    is the post-training (step-0) model."""
    config = DKMConfig(bits=2, weight_threshold=1000)
    model = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=config)
    post_training = copy.deepcopy(model).eval()
    best = BEST_BY_LOSS | {"eval_steps": every, "save_steps": every}
    args = _args(out, max_steps=9, **best, initial_model_margin=margin)
    data = {"train_dataset": ToyDataset(64), "eval_dataset": ToyDataset(32, seed=1)}
    trainer = DKMTrainer(model=model, args=args, compute_metrics=accuracy, **data)
    trainer.train()
    losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    x = ToyDataset(8, seed=2)[:8]["input_ids"]
    with torch.no_grad():
        kept_initial = torch.equal(model.eval()(x).logits, post_training(x).logits)
    return trainer.state, losses, kept_initial


def test_initial_model_margin(tmp_path):
    """A trained checkpoint replaces step 0 as the best only when it beats it by more than `initial_model_margin`;
    among trained checkpoints transformers' rule holds as it is."""
    path = save_toy_bert(tmp_path / "bert")
    state, losses, kept_initial = _best_model_run(path, tmp_path / "plain")
    trained = min(losses[s] for s in (3, 6, 9))
    gain = losses[0] - trained
    assert gain > 0 and not kept_initial and state.best_metric == trained  # training helps on this task
    state, again, kept_initial = _best_model_run(path, tmp_path / "wide", margin=1.5 * gain)
    assert again == losses  # the margin changes the choice only, not the run
    assert kept_initial and state.best_model_checkpoint.endswith("checkpoint-0") and state.best_metric == losses[0]
    state, _, kept_initial = _best_model_run(path, tmp_path / "narrow", margin=0.5 * gain)
    assert not kept_initial and state.best_metric == trained


def test_end_of_phase_against_step_zero(tmp_path):
    """README's recipe at 3 bits and fewer: evaluation and checkpoints at step 0 and at the last step only. The end
    model replaces step 0 when it beats it by more than the margin; the evaluations in between do not change the run
    (the same end model as with an evaluation every 3 steps). That holds for a model without dropout, like this toy:
    with dropout, each evaluation's DataLoader draws its seed from torch's global generator, so the masks after it
    differ (plain transformers behaves the same)."""
    path = save_toy_bert(tmp_path / "bert")
    _, every_3, _ = _best_model_run(path, tmp_path / "every-3")
    state, ends, kept_initial = _best_model_run(path, tmp_path / "ends", every=9)
    assert sorted(ends) == [0, 9] and ends == {0: every_3[0], 9: every_3[9]}
    gain = ends[0] - ends[9]
    assert gain > 0 and not kept_initial
    assert state.best_model_checkpoint.endswith("checkpoint-9") and state.best_metric == ends[9]
    state, _, kept_initial = _best_model_run(path, tmp_path / "ends-wide", margin=2 * gain, every=9)
    assert kept_initial and state.best_model_checkpoint.endswith("checkpoint-0") and state.best_metric == ends[0]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"initial_model_margin": -0.1}, "must be >= 0"),
        ({"initial_model_margin": 0.1}, "needs load_best_model_at_end=True"),
    ],
)
def test_initial_model_margin_errors(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)


def _step_gradient(path, model_cls, data, tmp_path, batch: int, accumulation: int, teacher: bool):
    """Every parameter's gradient of the first optimizer step (with SGD at lr 1 and no clipping, the weight change)
    and the logged loss."""
    student = model_cls.from_pretrained(path, dkm_config=DKMConfig(bits=3, weight_threshold=1000))
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        max_grad_norm=0,
        dkm_milestone=100,  # the dense phase: the same weights in every forward (see below)
    )
    teacher_model = model_cls.from_pretrained(path) if teacher else None
    return first_step_change(DKMTrainer(model=student, args=args, train_dataset=data, teacher_model=teacher_model))


@pytest.mark.parametrize("teacher", [False, True], ids=["task", "distilled"])
@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_gradient_is_the_same_for_every_accumulation_split(tmp_path, tiny_dir, task, teacher):
    """One global batch of 4 as 4x1, 2x2 and 1x4 (micro-batch x accumulation steps) gives one gradient. Trainer counts
    the labelled items of the whole step and leaves the loss undivided for models whose forward takes **kwargs; the
    distillation loss (and BERT's classification loss, a plain batch mean) must be normalised over that count too, or
    the gradient grows with the accumulation steps (it was 1x / 2x / 4x). The causal-LM rows have 8, 6, 4 and 0
    labelled next tokens (prompt positions are -100), so the micro-batches weigh by their token counts, and one
    micro-batch of 1 x 4 has none: it adds nothing (its mean would be nan), and the logged loss is the same too.

    Clustering starts after the step (`dkm_milestone`): once it runs, each forward continues the centroid iterations
    from the previous forward's centroids, so 4 micro-batches see slightly different soft weights than 1 (a few %
    of the gradient norm on these models): a property of DKM, not of the loss scaling tested here.

    Tolerance: the splits sum each gradient element over the same n <= 48 token or example rows in another order
    (kernels over 4, 2 or 1 rows, then autograd's accumulation), which moves it by at most (n - 1) U times the
    magnitudes summed (conftest.U); allowing those 10x the largest gradient element: 48 x 10 U = 2.9e-5 of it.
    Measured: at most 5.1e-7, also with ATen / MKL / oneDNN kernels limited to SSE4; the bug changed it by 1x-3x."""
    if task == "classification":
        path, model_cls, data = save_toy_bert(tmp_path / "bert"), AutoModelForSequenceClassification, ToyDataset(4)
    else:
        path, model_cls = tiny_dir("llama"), AUTO["llama"]
        ids = torch.randint(1, 99, (4, 9), generator=torch.Generator().manual_seed(3))
        data = []
        for row, prompt in zip(ids, (0, 2, 4, 9)):
            labels = row.clone()
            labels[:prompt] = -100
            data.append({"input_ids": row, "labels": labels, "attention_mask": torch.ones_like(row)})
    whole, loss = _step_gradient(path, model_cls, data, tmp_path, 4, 1, teacher)
    assert whole.norm() > 0
    for batch, accumulation in ((2, 2), (1, 4)):
        split, split_loss = _step_gradient(path, model_cls, data, tmp_path, batch, accumulation, teacher)
        assert split_loss == pytest.approx(loss, rel=1e-6)  # a sum of <= 4 positive terms reordered: 3 U relative
        assert_within(split, whole, 48 * 10 * U, whole.abs().max().item(), f"gradient of {batch} x {accumulation}")


def test_the_kl_term_averages_over_the_positions_its_mask_keeps():
    """With a mask the KL is the mean over the kept positions (as the task loss counts its labelled tokens), not
    the sum over them divided by every position."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.zeros(2, 5)
    mask[0, 1] = mask[1, 3] = 1
    kept = kl_term(student[mask.bool()], teacher[mask.bool()], 2.0, None)
    assert kl_term(student, teacher, 2.0, mask).item() == pytest.approx(kept.item(), rel=1e-6)


def test_the_hidden_term_is_the_mean_over_layers():
    student = (torch.zeros(2, 3), torch.zeros(2, 3))
    teacher = (torch.ones(2, 3), torch.full((2, 3), 3.0**0.5))
    assert hidden_term(student, teacher).item() == pytest.approx(2.0)  # (1 + 3) / 2


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 6)
        self.calls = []

    def forward(self, x, labels=None, use_cache=True, output_hidden_states=False):
        self.calls.append(use_cache)
        logits = self.head(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(logits=logits, loss=loss, hidden_states=None)


def test_the_teacher_runs_without_its_kv_cache():
    """A teacher whose forward takes `use_cache` gets use_cache=False (with a cache transformers builds the causal
    mask without looking for packed sequences in position_ids)."""
    torch.manual_seed(0)
    student, teacher = _LM(), _LM()
    x, labels = torch.randn(2, 3, 4), torch.randint(0, 6, (2, 3))
    loss, _, terms = distilled_loss(student, teacher, {"x": x, "labels": labels}, 0.5, 2.0, 0.0, labels >= 0, False)
    assert teacher.calls == [False]
    assert torch.isfinite(loss) and set(terms) == {"distill_task_loss", "distill_kl"}
