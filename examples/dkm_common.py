"""What the example scripts share: the command line, the DKM arguments, data splits, the metric, sizes, memory, the
report, and the whole flow of the classification examples (`run_classification`).

The classification scripts (glue/, vision/) bring only what is specific to their task: their options and defaults,
the data, its preprocessing and the model class (a `ClassificationTask`). `run_classification` does the rest:

    dense fine-tune (new head) -> saved to dense/ and evaluated
    control (optional): the DKM phase's recipe without clustering, from dense/
    for each bit width: DKM fine-tune from dense/ -> palettized checkpoint compressed-<bits>bit/ -> reloaded from
                        disk with a plain `from_pretrained` and evaluated (the accuracy the report gives)
    results.json + results.md
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments, set_seed

import dkm_hf
from dkm_hf import DKMTrainer, DKMTrainingArguments

# `evaluate.load("accuracy")` downloads its script; this local copy works offline.
ACCURACY_SCRIPT = str(Path(__file__).resolve().parent / "metrics" / "accuracy.py")


@dataclass
class DKMArguments:
    bits: list[int] = field(default_factory=lambda: [4], metadata={"help": "Bit width(s), e.g. --bits 4 3 2."})
    cluster_dim: int = field(default=1, metadata={"help": "Length of the clustered vectors (bits/weight = bits/d)."})
    tau: float | None = field(
        default=None,
        metadata={
            "help": "DKM softmax temperature, relative to each LUT group's weight variance (see --tau_scale). "
            "Default: dkm_hf's for the bit width (0.01 at 4 bits, 0.05 at 3 and 2)."
        },
    )
    tau_scale: str = field(default="variance", metadata={"help": "`variance` (tau is relative) or `absolute`."})
    max_iters: int = field(default=3, metadata={"help": "DKM iterations per forward pass."})
    granularity: str = field(default="per_tensor", metadata={"help": "per_tensor or per_grouped_channel LUTs."})
    group_size: int | None = field(default=None, metadata={"help": "Output channels per LUT (per_grouped_channel)."})
    per_channel_scale: bool = field(default=False, metadata={"help": "Scale each output channel into [-1, 1]."})
    overrides: str = field(
        default="{}", metadata={"help": 'JSON: regex -> settings, e.g. \'{".*embed.*": {"bits": 3}}\''}
    )
    weight_threshold: int = field(default=2048, metadata={"help": "Weights with fewer elements stay float."})
    kmeans_restarts: int = field(
        default=dkm_hf.DKMConfig.kmeans_restarts,
        metadata={"help": "k-means runs per LUT at initialisation, the lowest-inertia one kept."},
    )
    kmeans_seed: int = field(default=0, metadata={"help": "Seed of the k-means initialisation (DKMConfig.seed)."})

    def __post_init__(self):
        # every width's config is built once here, so that a bad width, tau, granularity or --overrides is refused
        # when the command line is parsed, not after the widths before it have trained
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"--bits {' '.join(map(str, self.bits))}: each bit width once")
        for bits in self.bits:
            self.config(bits)

    def config(self, bits: int) -> dkm_hf.DKMConfig:
        try:
            overrides = json.loads(self.overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--overrides is not JSON ({error}): {self.overrides!r}") from None
        return dkm_hf.DKMConfig(
            bits=bits,
            cluster_dim=self.cluster_dim,
            tau=self.tau,
            tau_scale=self.tau_scale,
            max_iters=self.max_iters,
            granularity=self.granularity,
            group_size=self.group_size,
            per_channel_scale=self.per_channel_scale,
            overrides=overrides,
            weight_threshold=self.weight_threshold,
            kmeans_restarts=self.kmeans_restarts,
            seed=self.kmeans_seed,
        )


def accuracy_metric():
    """`compute_metrics` for a Trainer: accuracy of the argmax of the logits."""
    metric = evaluate.load(ACCURACY_SCRIPT)

    def compute_metrics(prediction):
        return metric.compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)

    return compute_metrics


def peak_rss_mb(reset: bool = False) -> float:
    """The process's peak resident memory in MiB since the last reset (Linux: VmHWM, reset via clear_refs; elsewhere
    the process's peak, which no reset lowers; NaN where the platform reports none, as on Windows)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        try:
            import resource
        except ImportError:
            return float("nan")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def checkpoint_bytes(folder: str) -> int:
    """Bytes of a checkpoint's weights: its safetensors files."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def checkpoint_format(folder: str) -> str:
    """'palettized' for a compressed checkpoint (read from its config.json), 'dense' otherwise."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("quantization_config", {}).get("format", "dense")


def record_variant(results: dict, bits: int, accuracy: float, metrics: dict, compressed_dir: str, seconds: float):
    """Add one compressed variant (accuracy of the reloaded checkpoint, in-memory metrics, size) to `results`."""
    size = checkpoint_bytes(compressed_dir)
    variant = {
        "bits": bits,
        "accuracy": accuracy,
        "accuracy_in_memory": metrics.get("eval_accuracy"),
        "accuracy_soft": metrics.get("eval_soft_accuracy"),
        "checkpoint": compressed_dir,
        "checkpoint_format": checkpoint_format(compressed_dir),
        "bytes": size,
        "compression": results["dense"]["bytes"] / size,
        "seconds": seconds,
    }
    results["variants"].append(variant)
    print(
        f"{bits}-bit: accuracy {accuracy:.4f} (reloaded from {compressed_dir}), "
        f"{size / 2**20:.2f} MiB, {variant['compression']:.1f}x smaller"
    )


def write_results(results: dict, out: Path) -> str:
    """Write results.json and results.md into `out`; return the Markdown."""
    dense = results["dense"]
    lines = [
        f"Model `{results['model']}` on {results['task']} "
        f"({results['train_samples']} train / {results['eval_samples']} validation examples)",
        "",
        "| model | accuracy (%) | Δ vs dense | checkpoint | size (MiB) | compression | time (s) |",
        "|---|---|---|---|---|---|---|",
        f"| dense | {100 * dense['accuracy']:.2f} | | `{dense['checkpoint']}` | {dense['bytes'] / 2**20:.2f} | 1.0x "
        f"| {dense['seconds']:.0f} |",
    ]
    if "control" in results:
        control = results["control"]
        lines.append(
            f"| control: DKM recipe without clustering | {100 * control['accuracy']:.2f} "
            f"| {100 * (control['accuracy'] - dense['accuracy']):+.2f} | | | | {control['seconds']:.0f} |"
        )
    for v in results["variants"]:
        delta = 100 * (v["accuracy"] - dense["accuracy"])
        lines.append(
            f"| DKM {v['bits']}-bit, reloaded from disk | {100 * v['accuracy']:.2f} | {delta:+.2f} "
            f"| `{v['checkpoint']}` ({v['checkpoint_format']}) | {v['bytes'] / 2**20:.2f} | {v['compression']:.1f}x "
            f"| {v['seconds']:.0f} |"
        )
    lines += ["", f"Wall time: {results['wall_seconds']:.0f} s", ""]
    markdown = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    return markdown


# -- the command line ------------------------------------------------------------------------------------------------
def parse_arguments(model_arguments: type, data_arguments: type, training_defaults: dict, argv: list[str] | None):
    """(model_args, data_args, dkm_args, training_args) from the command line (`argv`, default sys.argv).

    A script's own `model_arguments` and `data_arguments` dataclasses come first, then `DKMArguments` and
    `DKMTrainingArguments`; `training_defaults` replaces their defaults (the script's DKM recipe). Seeds everything
    with the parsed seed and creates the output directory.
    """
    # no abbreviations: `--max_step 1` would be max_steps for the parser but not for a script's per-width recipe
    types = (model_arguments, data_arguments, DKMArguments, DKMTrainingArguments)
    parser = HfArgumentParser(types, allow_abbrev=False)
    parser.set_defaults(**training_defaults)
    model_args, data_args, dkm_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.resume_from_checkpoint is not None:
        raise ValueError(
            "--resume_from_checkpoint: this script runs several trainings (dense, control, one per bit width), each "
            "in its own folder under --output_dir; run it again (examples/causal_lm/sft_dkm.py resumes one training)"
        )
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1 (or left out for all), got {value}")
    set_seed(training_args.seed)
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    return model_args, data_args, dkm_args, training_args


# -- data ------------------------------------------------------------------------------------------------------------
def with_validation(raw: datasets.DatasetDict, fraction: float, seed: int) -> datasets.DatasetDict:
    """`raw` itself if it has a validation split; otherwise its train split cut into train and validation."""
    if "validation" in raw:
        return raw
    split = raw["train"].train_test_split(test_size=fraction, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def subsample(raw: datasets.DatasetDict, max_train: int | None, max_eval: int | None, seed: int):
    """Keep a seeded random `max_train` / `max_eval` examples of the train / validation splits (None: all)."""
    for name, limit in (("train", max_train), ("validation", max_eval)):
        if limit is not None and len(raw[name]) > limit:
            raw[name] = raw[name].shuffle(seed=seed).select(range(limit))
    return raw


# -- the flow of the classification examples -------------------------------------------------------------------------
@dataclass
class ClassificationTask:
    """What a classification script hands to `run_classification`: everything specific to its task."""

    model_class: type  # an AutoModelFor...Classification: loads the pretrained, dense, DKM and palettized models
    model_path: str  # the pretrained model (folder or Hub id); it gets a new head with `label_names`
    data: datasets.DatasetDict  # "train" and "validation", ready for `collator` (which yields a "labels" tensor)
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    label_names: list[str]
    description: str  # what results.json / results.md call the task
    dense_lr_scheduler_type: str  # the dense fine-tune's schedule (the DKM phase's is --lr_scheduler_type)
    dense_warmup_steps: float  # the dense fine-tune's warmup (< 1: a fraction of its steps)
    unit: str = "examples"  # what one example is, for the log: "examples", "images"
    processor: Any = None  # tokenizer / image processor: every Trainer's `processing_class`, saved with checkpoints
    details: dict[str, Any] = field(default_factory=dict)  # task options recorded in results.json


def check_dkm_configs(model_class, config, dkm_configs) -> None:
    """Each bit width's DKMConfig applied to a meta-device copy of the model (no weights, no k-means): an override
    that matches no weight, or a layout that does not fit one, is refused before anything trains (not after the
    dense fine-tune and the control)."""
    for dkm_config in dkm_configs:
        with torch.device("meta"):
            model = model_class.from_config(config)
        dkm_hf.prepare(model, dkm_config, init=False)


def run_classification(
    argv: list[str] | None,
    model_arguments: type,
    data_arguments: type,
    training_defaults: dict,
    load_task: Callable[[Any, Any, int], ClassificationTask],
) -> dict:
    """A classification example from its command line to results.json / results.md; returns the results.

    `model_arguments` must have the fields `model_name_or_path`, `dense_finetune`, `dense_learning_rate`,
    `dense_num_train_epochs` and `control`; `training_defaults` is the DKM phase's recipe (the dense and control runs
    copy it, the dense one with its own learning rate, epochs, schedule and warmup). `load_task(model_args,
    data_args, seed)` loads the model path, the data and its preprocessing. The wall time counts from before it.
    """
    model_args, data_args, dkm_args, training_args = parse_arguments(
        model_arguments, data_arguments, training_defaults, argv
    )
    out = Path(training_args.output_dir)
    start = time.time()
    task = load_task(model_args, data_args, training_args.seed)
    train, validation = task.data["train"], task.data["validation"]
    compute_metrics = accuracy_metric()

    def trainer_for(model, args: TrainingArguments, cls: type = Trainer) -> Trainer:
        return cls(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            data_collator=task.collator,
            processing_class=task.processor,
            compute_metrics=compute_metrics,
        )

    print(f"train {len(train)} / validation {len(validation)} {task.unit}; labels {task.label_names}")
    results = {
        "model": task.model_path,
        "task": task.description,
        "train_samples": len(train),
        "eval_samples": len(validation),
        **task.details,
        "dkm": {k: v for k, v in dataclasses.asdict(dkm_args).items() if k != "bits"},
        "dkm_learning_rate": training_args.learning_rate,
        "dkm_lr_scheduler_type": getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        "dkm_num_train_epochs": training_args.num_train_epochs,
        "variants": [],
    }

    # -- dense fine-tune with a new head --------------------------------------------------------------------------
    t0 = time.time()
    dense_dir = str(out / "dense")
    names = task.label_names
    config = AutoConfig.from_pretrained(
        task.model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    check_dkm_configs(task.model_class, config, [dkm_args.config(bits) for bits in dkm_args.bits])
    model = task.model_class.from_pretrained(task.model_path, config=config, ignore_mismatched_sizes=True)
    dense_run = phase_arguments(
        training_args,
        out / "dense-run",
        plain=True,
        learning_rate=model_args.dense_learning_rate,
        num_train_epochs=model_args.dense_num_train_epochs,
        lr_scheduler_type=task.dense_lr_scheduler_type,
        warmup_steps=task.dense_warmup_steps,
    )
    trainer = trainer_for(model, dense_run)
    if model_args.dense_finetune:
        trainer.train()
    trainer.save_model(dense_dir)  # with the processor, as every checkpoint below
    dense_accuracy = trainer.evaluate()["eval_accuracy"]
    results["dense"] = {
        "accuracy": dense_accuracy,
        "checkpoint": dense_dir,
        "bytes": checkpoint_bytes(dense_dir),
        "seconds": time.time() - t0,
    }
    print(f"dense: accuracy {dense_accuracy:.4f}, {results['dense']['bytes'] / 2**20:.2f} MiB")
    del model, trainer

    # -- control: the DKM phase's recipe without clustering -------------------------------------------------------
    if model_args.control:
        t0 = time.time()
        model = task.model_class.from_pretrained(dense_dir)
        trainer = trainer_for(model, phase_arguments(training_args, out / "control-run", plain=True))
        trainer.train()
        results["control"] = {"accuracy": trainer.evaluate()["eval_accuracy"], "seconds": time.time() - t0}
        print(f"control (same recipe, no clustering): accuracy {results['control']['accuracy']:.4f}")
        del model, trainer

    # -- DKM fine-tune, palettize, reload from disk, evaluate -----------------------------------------------------
    for bits in dkm_args.bits:
        t0 = time.time()
        model = task.model_class.from_pretrained(dense_dir, dkm_config=dkm_args.config(bits))
        compressed_dir = str(out / f"compressed-{bits}bit")
        trainer = trainer_for(model, phase_arguments(training_args, out / f"dkm-{bits}bit-run"), DKMTrainer)
        trainer.train()
        in_memory = trainer.evaluate()  # hard (snapped) weights, and soft ones with --eval_soft
        trainer.save_model(compressed_dir)  # palettized: LUTs + packed indices
        del model, trainer

        reloaded = task.model_class.from_pretrained(compressed_dir)  # plain from_pretrained
        accuracy = accuracy_of(reloaded, validation, task.collator, training_args.per_device_eval_batch_size)
        record_variant(results, bits, accuracy, in_memory, compressed_dir, time.time() - t0)
        del reloaded

    results["wall_seconds"] = time.time() - start
    print(write_results(results, out))
    return results


def phase_arguments(training_args: TrainingArguments, output_dir: Path, plain: bool = False, **changes):
    """The arguments of one training run of the flow: `training_args` writing to `output_dir`, with `changes`.

    `plain`: a bare `TrainingArguments` (the DKM-only fields dropped) for the dense and control runs, which use a
    plain `Trainer`.
    """
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values.update(output_dir=str(output_dir), **changes)
    return TrainingArguments(**values) if plain else dataclasses.replace(training_args, **values)


@torch.no_grad()
def accuracy_of(model, dataset, collator, batch_size: int) -> float:
    """Accuracy of `model` on `dataset` (a Trainer refuses to wrap an already-palettized model, so a plain loop)."""
    model.eval()
    correct = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)
