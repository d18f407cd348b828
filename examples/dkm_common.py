"""What the example scripts share: the DKM command-line arguments, the metric, sizes, memory and the results report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np

import dkm_hf

# `evaluate.load("accuracy")` downloads its script; this local copy works offline.
ACCURACY_SCRIPT = str(Path(__file__).resolve().parent / "metrics" / "accuracy.py")


@dataclass
class DKMArguments:
    bits: list[int] = field(default_factory=lambda: [4], metadata={"help": "Bit width(s), e.g. --bits 4 3 2."})
    cluster_dim: int = field(default=1, metadata={"help": "Length of the clustered vectors (bits/weight = bits/d)."})
    tau: float = field(
        default=dkm_hf.DKMConfig.tau,
        metadata={"help": "DKM softmax temperature, relative to each LUT group's weight variance (see --tau_scale)."},
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

    def config(self, bits: int) -> dkm_hf.DKMConfig:
        return dkm_hf.DKMConfig(
            bits=bits,
            cluster_dim=self.cluster_dim,
            tau=self.tau,
            tau_scale=self.tau_scale,
            max_iters=self.max_iters,
            granularity=self.granularity,
            group_size=self.group_size,
            per_channel_scale=self.per_channel_scale,
            overrides=json.loads(self.overrides),
            weight_threshold=self.weight_threshold,
        )


def accuracy_metric():
    """`compute_metrics` for a Trainer: accuracy of the argmax of the logits."""
    metric = evaluate.load(ACCURACY_SCRIPT)

    def compute_metrics(prediction):
        return metric.compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)

    return compute_metrics


def peak_rss_mb(reset: bool = False) -> float:
    """The process's peak resident memory in MiB since the last reset (Linux: VmHWM, reset via clear_refs)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
