"""`dkm-hf`: look into palettized checkpoints without building the model.

dkm-hf inspect DIR                      per-layer table (shape, bits, LUT layout, distinct values, bytes) + totals
dkm-hf plot DIR --out FILE.png [--layers REGEX] [--original DENSE_DIR]
                                        weight histograms with the LUT centroids marked
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import logging

from .checkpoint import (
    CheckpointSummary,
    LayerSummary,
    PalettizedCheckpointError,
    checkpoint_files,
    summarize,
)
from .hub import human_bytes
from .packing import unpack_indices

MAX_PLOTS = 16


def _tensor(summary: CheckpointSummary, key: str) -> torch.Tensor | None:
    entry = summary.tensors.get(key)
    if entry is None:
        return None
    with safe_open(entry.file, framework="pt") as f:
        return f.get_tensor(key)


def _indices(summary: CheckpointSummary, layer: LayerSummary) -> torch.Tensor:
    n = layer.numel // layer.cluster_dim
    packed = _tensor(summary, f"{layer.name}.weight_indices")
    return unpack_indices(packed, layer.bits, n).view(layer.groups, -1)


def distinct_values(summary: CheckpointSummary, layer: LayerSummary) -> int:
    """How many distinct centroids (values, or vectors when cluster_dim > 1) the layer's weights actually use."""
    lut = _tensor(summary, f"{layer.name}.weight_lut")
    indices = _indices(summary, layer)
    used = lut[torch.arange(layer.groups).unsqueeze(1), indices]
    return int(torch.unique(used.reshape(-1, layer.cluster_dim), dim=0).shape[0])


def inspect_table(summary: CheckpointSummary, with_distinct: bool = True) -> str:
    """The Markdown table `dkm-hf inspect` prints."""
    header = "| module | shape | bits | cluster_dim | granularity | scale | distinct | bytes on disk | vs fp16 |"
    lines = [header, "|---|---|---:|---:|---|---|---:|---:|---:|"]
    layers = summary.layers
    for layer in logging.tqdm(layers, desc="dkm-hf: reading indices", delay=2.0, leave=False):
        shape = "x".join(map(str, layer.shape))
        if layer.tied_to is not None:
            lines.append(f"| {layer.name} | {shape} | | | tied to {layer.tied_to} | | | 0 | |")
            continue
        granularity = "per_tensor" if layer.groups == 1 else f"grouped ({layer.groups} LUTs)"
        distinct = distinct_values(summary, layer) if with_distinct else ""
        lines.append(
            f"| {layer.name} | {shape} | {layer.bits} | {layer.cluster_dim} | {granularity} | "
            f"{'yes' if layer.per_channel_scale else 'no'} | {distinct} | {layer.bytes_on_disk:,} | "
            f"{layer.numel * 2 / layer.bytes_on_disk:.2f}x |"
        )
    total, fp32, fp16 = summary.total_bytes, summary.dense_bytes(4), summary.dense_bytes(2)
    clustered = sum(layer.numel for layer in layers if layer.tied_to is None)
    lines += [
        "",
        f"clustered layers: {len([x for x in layers if x.tied_to is None])} ({clustered:,} weights) in "
        f"{summary.clustered_bytes:,} bytes",
        f"checkpoint: {total:,} bytes ({human_bytes(total)}) in {len(summary.files)} file(s)",
        f"dense fp32: {fp32:,} bytes ({human_bytes(fp32)}), compression {fp32 / total:.2f}x",
        f"dense fp16: {fp16:,} bytes ({human_bytes(fp16)}), compression {fp16 / total:.2f}x",
    ]
    return "\n".join(lines)


def _original_weight(directory: str, name: str) -> torch.Tensor | None:
    key = f"{name}.weight"
    for path in checkpoint_files(directory):
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            match = (
                key if key in keys else next((k for k in keys if k.endswith("." + key) or key.endswith("." + k)), None)
            )
            if match is not None:
                return f.get_tensor(match).float()
    return None


def _channel_rows(directory: str, name: str, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """`weight` as (channels, features) rows: transformers' Conv1D stores (in, out), so ask the model's class."""
    transposed = weight.dim() == 2 and weight.shape[0] != channels
    if weight.dim() == 2 and weight.shape[0] == weight.shape[1]:
        transposed = _is_conv1d(directory, name)
    return weight.t() if transposed else weight.reshape(channels, -1)


def _is_conv1d(directory: str, name: str) -> bool:
    import transformers
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(directory)
    architecture = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    with torch.device("meta"):
        model = architecture(config)
    return isinstance(model.get_submodule(name), Conv1D)


def plot(directory: str, out: str, layers: str | None = None, original: str | None = None) -> list[str]:
    """Histogram per chosen layer: original weights (if given) or the decoded weights, with LUT centroids marked.

    With per-channel scales the LUT lives in scaled units, so the weights are divided by their channel's scale.
    With cluster_dim > 1 every centroid component is marked. Returns the plotted layer names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(directory)
    pattern = re.compile(layers) if layers else None
    chosen = [x for x in summary.layers if x.tied_to is None and (pattern is None or pattern.search(x.name))]
    if not chosen:
        raise PalettizedCheckpointError(f"no palettized layer matches {layers!r}")
    if len(chosen) > MAX_PLOTS:
        print(f"dkm-hf plot: {len(chosen)} layers match, plotting the first {MAX_PLOTS} (narrow them with --layers)")
        chosen = chosen[:MAX_PLOTS]
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, logging.tqdm(chosen, desc="dkm-hf: plotting", delay=2.0, leave=False)):
        lut = _tensor(summary, f"{layer.name}.weight_lut").float()
        scale = _tensor(summary, f"{layer.name}.weight_scale")
        dense = _original_weight(original, layer.name) if original else None
        if dense is not None:
            if scale is not None:
                dense = _channel_rows(original, layer.name, dense, scale.shape[0]) / scale.float()
            values, label = dense.reshape(-1), "original"
        else:
            indices = _indices(summary, layer)
            values = lut[torch.arange(layer.groups).unsqueeze(1), indices].reshape(-1)
            label = "palettized"
        ax.hist(values.numpy(), bins=120, color="tab:blue", alpha=0.7, label=label)
        for c in lut.reshape(-1).unique().tolist():
            ax.axvline(c, color="tab:red", linewidth=0.6, alpha=0.6 if layer.groups == 1 else 0.25)
        unit = " / channel scale" if scale is not None else ""
        ax.set_title(f"{layer.name}\n{layer.bits} bits, d={layer.cluster_dim}, {layer.groups} LUT(s)", fontsize=8)
        ax.set_xlabel(f"weight{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [x.name for x in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dkm-hf", description="Inspect DKM palettized checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="per-layer table and totals of a palettized checkpoint")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print the totals as JSON after the table")
    draw = commands.add_parser("plot", help="weight histograms with the LUT centroids marked")
    draw.add_argument("directory")
    draw.add_argument("--out", required=True, help="PNG file to write")
    draw.add_argument("--layers", default=None, help="regex (re.search) over module names")
    draw.add_argument("--original", default=None, help="directory of the dense model the checkpoint came from")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            summary = summarize(args.directory)
            print(inspect_table(summary))
            if args.json:
                totals = {
                    "checkpoint_bytes": summary.total_bytes,
                    "dense_fp32_bytes": summary.dense_bytes(4),
                    "dense_fp16_bytes": summary.dense_bytes(2),
                }
                print(json.dumps(totals))
        else:
            names = plot(args.directory, args.out, args.layers, args.original)
            print(f"wrote {args.out} ({len(names)} layer(s))")
    except (ValueError, OSError) as err:  # PalettizedCheckpointError is a ValueError
        print(f"dkm-hf {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
