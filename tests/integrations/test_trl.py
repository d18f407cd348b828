"""DKM inside TRL's `SFTTrainer` through `DKMTrainerMixin`: plain-text and chat data, palettized saving, the step-0
hard model, distillation and gradient accumulation, on a tiny Llama and a word-level tokenizer built here."""

from __future__ import annotations

import copy
import math
import pickle
import shutil
import types

import pytest
import torch
from conftest import U, assert_within, first_step_change, save_tiny

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import dkm_hf  # noqa: E402
from dkm_hf import DKMConfig, DKMTrainerMixin, with_dkm_arguments  # noqa: E402

WORDS = [f"w{i}" for i in range(90)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
DKMSFTConfig = with_dkm_arguments(trl.SFTConfig)
CONFIG = {"bits": 3, "weight_threshold": 1000}


class DKMSFTTrainer(DKMTrainerMixin, trl.SFTTrainer):
    pass


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, ids within TINY["llama"]'s vocabulary of 99; `[EOS]` is id 0, the config's eos and pad token."""
    vocab = {word: i for i, word in enumerate(["[EOS]", "[UNK]", "<|user|>", "<|assistant|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def sentences(n: int, seed: int, low: int = 4, high: int = 12) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, 20, (k,), generator=g).tolist()) for k in lengths]


def text_data(n: int, seed: int) -> Dataset:
    return Dataset.from_dict({"text": sentences(n, seed)})


def chat_data(n: int, seed: int) -> Dataset:
    questions, answers = sentences(n, seed, 2, 6), sentences(n, seed + 100, 2, 6)
    messages = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(questions, answers)
    ]
    return Dataset.from_dict({"messages": messages})


@pytest.fixture
def llama(tmp_path):
    return save_tiny("llama", tmp_path / "llama")


def _args(tmp_path, **kw) -> trl.SFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
        "max_steps": 4,
    }
    return DKMSFTConfig(**{**base, **kw})


def _student(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, dkm_config=DKMConfig(**{**CONFIG, **config}))


def _eval_loss(model, trainer) -> float:
    """The model's mean token loss on the trainer's eval set (one batch), by its own forward."""
    (batch,) = list(trainer.get_eval_dataloader())
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "use_cache"}).loss.item()


@pytest.mark.parametrize("data", [text_data, chat_data], ids=["text", "chat"])
def test_sft_saves_the_palettized_hard_model(llama, tmp_path, data):
    """`save_model` writes LUT + packed indices; the reloaded model is the trained hard model, and the eval loss
    SFTTrainer reports (through its fused LM head) is that model's loss."""
    model = _student(llama)
    args = _args(tmp_path, eval_strategy="steps", eval_steps=4)
    trainer = DKMSFTTrainer(
        model=model,
        args=args,
        train_dataset=data(32, 0),
        eval_dataset=data(8, 1),
        processing_class=tokenizer(),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("dkm_tau" in e and "mean_token_accuracy" in e for e in logs)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 4]  # the post-training model of step 0, then the trained one

    trainer.save_model(str(tmp_path / "saved"))
    assert dkm_hf.dkm_modules(model)  # the in-memory model stays trainable
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert len(dkm_hf.palettized_modules(reloaded)) == len(dkm_hf.dkm_modules(model)) > 0
    assert not dkm_hf.dkm_modules(reloaded)
    ids = torch.randint(4, 24, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
    assert evals[-1]["eval_loss"] == pytest.approx(_eval_loss(reloaded, trainer), rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)


def test_soft_evaluation_of_a_dataset_given_to_evaluate(llama, tmp_path):
    """`eval_soft` evaluates the batches SFTTrainer prepared: a raw text dataset given to `evaluate` is tokenized for
    the soft pass too, and both metrics land in one log entry."""
    args = _args(tmp_path, eval_soft=True, max_steps=2)
    trainer = DKMSFTTrainer(
        model=_student(llama), args=args, train_dataset=text_data(16, 0), processing_class=tokenizer()
    )
    trainer.train()
    metrics = trainer.evaluate(text_data(8, 1))
    assert math.isfinite(metrics["eval_soft_loss"]) and metrics["eval_soft_loss"] != metrics["eval_loss"]
    entry = trainer.state.log_history[-1]
    assert (entry["eval_loss"], entry["eval_soft_loss"]) == (metrics["eval_loss"], metrics["eval_soft_loss"])
    assert not any(module.soft_eval for _, module in dkm_hf.dkm_modules(trainer.model))


def test_push_to_hub_uploads_the_palettized_model(llama, tmp_path, monkeypatch):
    """`trainer.push_to_hub()` uploads the palettized model (the Hub faked at HfApi: the folder is copied)."""
    pushed = tmp_path / "pushed"

    def upload_folder(api, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, pushed, ignore=shutil.ignore_patterns("_*", "checkpoint-*"))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    args = _args(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="someone/tiny-llama-sft-dkm")
    model = _student(llama)
    trainer = DKMSFTTrainer(model=model, args=args, train_dataset=text_data(8, 0), processing_class=tokenizer())
    trainer.train()
    trainer.push_to_hub()
    reloaded = AutoModelForCausalLM.from_pretrained(pushed)
    assert len(dkm_hf.palettized_modules(reloaded)) == len(dkm_hf.dkm_modules(model)) > 0
    ids = torch.randint(4, 24, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_plain_sft_config_gets_the_dkm_defaults(llama, tmp_path):
    """SFTConfig without the DKM fields: the trainer uses DKMTrainingFields' defaults (palettized saving included)."""
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, bf16=False)
    trainer = DKMSFTTrainer(
        model=_student(llama), args=args, train_dataset=text_data(8, 0), processing_class=tokenizer()
    )
    assert trainer.dkm_option("distill_alpha") == 0.5 and trainer.dkm_option("palettize_on_save")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert dkm_hf.palettized_modules(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))


def test_combined_arguments_keep_both_defaults_check_and_pickle(tmp_path):
    args = DKMSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, distill_alpha=0.25, max_length=64)
    plain = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.learning_rate, args.distill_temperature) == (plain.learning_rate, 2.0)  # SFTConfig's own 2e-5
    again = pickle.loads(pickle.dumps(args))  # Trainer writes training_args.bin
    assert type(again) is DKMSFTConfig and (again.distill_alpha, again.max_length) == (0.25, 64)
    assert with_dkm_arguments(trl.SFTConfig) is DKMSFTConfig
    assert with_dkm_arguments(dkm_hf.DKMTrainingArguments) is dkm_hf.DKMTrainingArguments
    with pytest.raises(ValueError, match="distill_alpha must be in"):
        DKMSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, distill_alpha=2.0)
    with pytest.raises(TypeError, match="TrainingArguments subclass"):
        with_dkm_arguments(dict)


def test_mixin_must_come_before_a_trainer(tmp_path):
    class Wrong(DKMTrainerMixin):
        pass

    with pytest.raises(TypeError, match="Wrong: DKMTrainerMixin goes before a Trainer subclass"):
        Wrong()


@pytest.mark.parametrize("sets", [1, 2], ids=["one eval set", "two eval sets"])
def test_sft_best_hard_model_never_worse_than_post_training(llama, tmp_path, sets):
    """The step-0 rule through the mixin: a run that only gets worse ends on the post-training model. With a dict of
    eval sets Trainer evaluates each (partial metrics) and merges them: the rule runs once, on the merged ones."""
    model = _student(llama, bits=2)
    post_training = copy.deepcopy(model).eval()
    args = _args(
        tmp_path,
        learning_rate=5.0,  # ruins the model
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss" if sets == 1 else "a_loss",
    )
    trainer = DKMSFTTrainer(
        model=model,
        args=args,
        train_dataset=chat_data(32, 0),
        eval_dataset=chat_data(8, 1) if sets == 1 else {"b": chat_data(8, 2), "a": chat_data(8, 1)},
        processing_class=tokenizer(),
    )
    trainer.train()
    key = "eval_loss" if sets == 1 else "eval_a_loss"
    evals = [e for e in trainer.state.log_history if key in e]
    assert evals[0]["step"] == 0 and min(e[key] for e in evals[1:]) > evals[0][key]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-0")
    ids = torch.randint(4, 24, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, post_training(ids).logits)


def test_sft_distillation(llama, tmp_path):
    """The logged terms are those of the logged loss: with micro-batches of different token counts accumulated into
    each step, each term is their mean weighted by the tokens (as Trainer weighs the losses), not the last one's."""
    teacher = AutoModelForCausalLM.from_pretrained(llama)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = _args(
        tmp_path,
        distill_alpha=0.7,
        distill_temperature=3.0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    trainer = DKMSFTTrainer(
        model=_student(llama),
        args=args,
        train_dataset=chat_data(32, 0),
        processing_class=tokenizer(),
        teacher_model=teacher,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 4 and all(math.isfinite(e["distill_kl"]) and e["distill_kl"] > 0 for e in logs)
    assert logs[0]["dkm_teacher_mb"] > 0
    for e in logs:  # float32 sums of a few terms: 1e-5 is ~100 U
        assert e["loss"] == pytest.approx(0.3 * e["distill_task_loss"] + 0.7 * e["distill_kl"], rel=1e-5), e
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())


@pytest.mark.parametrize("option", [{"loss_type": "dft"}, {"label_smoothing_factor": 0.1}])
def test_sft_loss_options_with_a_teacher_are_refused(llama, tmp_path, option):
    """The distillation loss takes the model's own cross-entropy as its task term: an SFT loss option would shape
    the evaluation loss only, so the combination is refused when the trainer is built."""
    with pytest.raises(ValueError, match=f"{next(iter(option))}.*evaluation only"):
        DKMSFTTrainer(
            model=_student(llama),
            args=_args(tmp_path, **option),
            train_dataset=chat_data(8, 0),
            processing_class=tokenizer(),
            teacher_model=AutoModelForCausalLM.from_pretrained(llama),
        )


def _step_gradient(path, data, tmp_path, batch: int, accumulation: int, teacher: bool, **kw):
    """Every parameter's change in the first optimizer step (SGD at lr 1, no clipping: the gradient) and the logged
    loss."""
    student = _student(path)
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        max_grad_norm=0,
        lr_scheduler_type="constant",
        dkm_milestone=100,  # the dense phase: the same weights in every forward
        **kw,
    )
    trainer = DKMSFTTrainer(
        model=student,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(),
        teacher_model=AutoModelForCausalLM.from_pretrained(path) if teacher else None,
    )
    return first_step_change(trainer)


@pytest.mark.parametrize(
    ("teacher", "packing"), [(False, False), (True, False), (True, True)], ids=["sft", "distilled", "distilled-packed"]
)
def test_gradient_is_the_same_for_every_accumulation_split(llama, tmp_path, teacher, packing):
    """One global batch of 4 prompt-completion rows as 4x1, 2x2 and 1x4 (micro-batch x accumulation steps) gives one
    gradient and one logged loss. Only the completions are labelled, 2 to 8 tokens per row, so the micro-batches
    weigh by their token counts (the distillation loss is a micro-batch mean that must be rescaled to that share).
    Tolerance as in test_distillation's accumulation test: the splits sum each element over the same <= 48 rows in
    another order, allowed 10x (n - 1) U of the largest gradient element. Packed (rows of 8 tokens cut from the
    concatenated examples, their sequences told apart by position_ids): the teacher must see the student's
    per-sequence attention, not attend across the packed sequences, whatever its config's use_cache."""
    prompts, completions = sentences(4, 3, 1, 8), sentences(4, 4, 1, 8)
    data = Dataset.from_dict({"prompt": prompts, "completion": completions})
    kw = {"packing": True, "max_length": 8} if packing else {}
    whole, loss = _step_gradient(llama, data, tmp_path, 4, 1, teacher, **kw)
    assert whole.norm() > 0
    for batch, accumulation in ((2, 2), (1, 4)):
        split, split_loss = _step_gradient(llama, data, tmp_path, batch, accumulation, teacher, **kw)
        assert split_loss == pytest.approx(loss, rel=1e-6)
        assert_within(split, whole, 48 * 10 * U, whole.abs().max().item(), f"gradient of {batch} x {accumulation}")


class DKMDPOTrainer(DKMTrainerMixin, trl.DPOTrainer):
    pass


def _preferences(n: int, seed: int) -> Dataset:
    prompt, chosen, rejected = (sentences(n, seed + i, 2, 5) for i in range(3))
    return Dataset.from_dict({"prompt": prompt, "chosen": chosen, "rejected": rejected})


@pytest.mark.parametrize("build", ["loaded", "precomputed", "loaded clustered"])
def test_dpo_measures_against_the_dense_reference_however_trl_builds_it(llama, tmp_path, build):
    """With `ref_model=None` TRL loads the reference from the policy's path (dense), precomputes it from the policy
    (its hard model, before), or loads it with `model_init_kwargs` that carry the policy's dkm_config (a second DKM
    model, hard as well): the DPO objective changed with a memory option. The reference is the dense model in all
    three: the step-0 evaluation is the same, and equals one computed against a dense reference by hand."""
    options = {"precomputed": {"precompute_ref_log_probs": True}}.get(build, {})
    if build == "loaded clustered":
        options["model_init_kwargs"] = {"dkm_config": DKMConfig(**CONFIG)}
    args = with_dkm_arguments(trl.DPOConfig)(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_length=32,
        max_steps=1, eval_strategy="steps", eval_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        disable_tqdm=True, **options,
    )  # fmt: skip
    trainer = DKMDPOTrainer(
        model=llama if build == "loaded clustered" else _student(llama),
        args=args,
        train_dataset=_preferences(8, 0),
        eval_dataset=_preferences(8, 10),
        processing_class=tokenizer(),
    )
    batch = next(iter(trainer.get_eval_dataloader()))
    dense = AutoModelForCausalLM.from_pretrained(llama).eval()
    trl.trainer.utils.add_fused_lm_head(dense)  # TRL's log-probs, as it computes them
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        kwargs = {"attention_mask": batch["attention_mask"], "labels": labels, "use_cache": False}
        expected = dense(input_ids=batch["input_ids"], fused_lm_head=True, **kwargs).log_probs.sum(1)
    if build == "precomputed":
        reference = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    else:
        reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    # the same computation on the same weights (the hard model is 0.15 away); sums of <= 32 tokens' log-probs in
    # whatever order the batch's shapes give: within a few U of the sum's magnitude
    assert_within(reference, expected, 64 * U, expected.abs().max().item(), "the reference's log-probs")
    trainer.train()
    step_0 = next(e for e in trainer.state.log_history if "eval_loss" in e)
    assert step_0["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)  # the hard policy against the dense reference


def test_a_teacher_for_a_trainer_with_its_own_objective_is_refused(llama, tmp_path):
    """DPO's loss is its preference objective (`loss_type=["sigmoid"]`), not the model's cross-entropy that
    distillation mixes with the teacher's KL: refused naming the trainer's objective (before: blamed as an option that
    "would apply in evaluation only")."""
    args = with_dkm_arguments(trl.DPOConfig)(
        output_dir=str(tmp_path / "out"), max_length=32, report_to=[], use_cpu=True, save_strategy="no"
    )
    with pytest.raises(ValueError, match=r"DKMDPOTrainer trains its own objective \(loss_type=\['sigmoid'\]\)"):
        DKMDPOTrainer(
            model=_student(llama),
            args=args,
            train_dataset=_preferences(8, 0),
            processing_class=tokenizer(),
            teacher_model=AutoModelForCausalLM.from_pretrained(llama),
        )
