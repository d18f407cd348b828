"""`dkm-hf`: look into palettized checkpoints without building the model.

dkm-hf inspect DIR [--json]             per-layer table (shape, bits, LUT layout, distinct values, bytes) + totals;
                                        LUTs with NaN/inf, set padding bits and checksum mismatches are flagged
dkm-hf plot DIR --out FILE.png [--layers REGEX] [--original DENSE_DIR]
                                        weight histograms with the LUT centroids marked
dkm-hf export --coreml DIR OUT.mlpackage [--example-shape NAME=1x128 ...] [--target iOS18]
                                        a Core ML package whose clustered weights are LUT ops holding the
                                        checkpoint's own LUTs and indices (needs dkm_hf[coreml])

Exit status: 0 on success, 1 when `inspect` flags a damaged layer, 2 when the input cannot be read or exported (one
line on stderr names the file and the problem).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.utils import logging

from .config import FORMAT_VERSION
from .errors import PalettizedCheckpointError
from .integrations.checkpoint_checks import CHECKSUM_PREFIX, VERSION_KEY, check_palettized_headers, checksum
from .integrations.coreml import coreml_target, load_palettized, to_coreml
from .integrations.model_card import human_bytes
from .integrations.safetensors_files import SafetensorsHeader, checkpoint_files, read_tensor, saved_variant
from .integrations.summary import CheckpointSummary, summarize
from .nn.layout import Layout
from .ops.packing import unpack_indices, unpack_range

MAX_PLOTS = 16
INDEX_CHUNK = 2**22  # indices per step of `entry_counts` (a multiple of 8)


def load_summary(directory: str) -> CheckpointSummary:
    """`summarize`, plus the header checks a load would make (so every stored tensor the table reads exists)."""
    summary = summarize(directory, saved_variant(directory) if os.path.isdir(directory) else None)
    lut_dtype = summary.config["quantization_config"].get("lut_dtype", "float16")
    if lut_dtype not in ("float16", "bfloat16", "float32"):
        raise PalettizedCheckpointError(f"{directory}/config.json: unknown lut_dtype {lut_dtype!r}")
    check_palettized_headers(SafetensorsHeader(summary.tensors, summary.metadata), summary.layouts, lut_dtype)
    return summary


def _tensor(summary: CheckpointSummary, name: str, buffer: str) -> torch.Tensor | None:
    entry = summary.stored(name).get(buffer)
    return None if entry is None else read_tensor(entry)


def entry_counts(summary: CheckpointSummary, name: str) -> torch.Tensor:
    """How many of the layer's weights (vectors) point at each LUT entry: (groups * 2**bits,) int64, in the LUT's
    order. Reads a chunk of indices at a time: the memory of a chunk, not of the weight."""
    layout = summary.layouts[name]
    packed = _tensor(summary, name, "weight_indices")
    k, per_group = 2**layout.bits, layout.vectors // layout.groups
    counts = torch.zeros(layout.groups * k, dtype=torch.int64)
    for start in range(0, layout.vectors, INDEX_CHUNK):
        stop = min(start + INDEX_CHUNK, layout.vectors)
        keys = torch.arange(start, stop) // per_group * k + unpack_range(packed, layout.bits, start, stop)
        counts += torch.bincount(keys, minlength=counts.numel())
    return counts


def distinct_values(summary: CheckpointSummary, name: str) -> int:
    """How many distinct centroids (values, or vectors when cluster_dim > 1) the layer's weights actually use."""
    layout = summary.layouts[name]
    lut = _tensor(summary, name, "weight_lut").reshape(-1, layout.cluster_dim)
    return int(torch.unique(lut[entry_counts(summary, name) > 0], dim=0).shape[0])


def problems(summary: CheckpointSummary, name: str) -> list[str]:
    """What is wrong with a layer's stored values: non-finite LUT / scale, set padding bits, checksum mismatches."""
    layout, found = summary.layouts[name], []
    for buffer in ("weight_lut", "weight_scale"):
        value = _tensor(summary, name, buffer)
        if value is not None and not bool(torch.isfinite(value.float()).all()):
            found.append(f"{int((~torch.isfinite(value.float())).sum())} NaN/inf in {buffer}")
    packed = _tensor(summary, name, "weight_indices")
    used = layout.vectors % 8
    if used and bool(unpack_indices(packed[-layout.bits :], layout.bits, 8)[used:].any()):
        found.append("padding bits set")
    for buffer, entry in summary.stored(name).items():
        recorded = summary.metadata.get(f"{CHECKSUM_PREFIX}{entry.name}")
        version = 1 if summary.metadata.get(VERSION_KEY, "1") == "1" else FORMAT_VERSION
        if recorded is not None and checksum(_tensor(summary, name, buffer), version) != recorded:
            found.append(f"{buffer} checksum mismatch")
    return found


def inspect_table(summary: CheckpointSummary, with_distinct: bool = True) -> tuple[str, int]:
    """The Markdown table `dkm-hf inspect` prints, and the number of layers flagged as damaged."""
    header = (
        "| module | shape | bits | cluster_dim | granularity | scale | distinct | bytes on disk | vs fp16 | check |"
    )
    lines = [header, "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    flagged = 0
    for name, layout in logging.tqdm(summary.layouts.items(), desc="dkm-hf: reading", delay=2.0, leave=False):
        shape = "x".join(map(str, layout.shape))
        if layout.tied_to is not None:
            lines.append(f"| {name} | {shape} | | | tied to {layout.tied_to} | | | 0 | | |")
            continue
        granularity = "per_tensor" if layout.groups == 1 else f"grouped ({layout.groups} LUTs)"
        found = problems(summary, name)
        flagged += bool(found)
        distinct = distinct_values(summary, name) if with_distinct and not found else ""
        on_disk = summary.bytes_on_disk(name)
        lines.append(
            f"| {name} | {shape} | {layout.bits} | {layout.cluster_dim} | {granularity} | "
            f"{'yes' if layout.per_channel_scale else 'no'} | {distinct} | {on_disk:,} | "
            f"{layout.numel * 2 / on_disk:.2f}x | {'DAMAGED: ' + '; '.join(found) if found else 'ok'} |"
        )
    total, fp32, fp16 = summary.total_bytes, summary.dense_bytes(4), summary.dense_bytes(2)
    clustered = sum(layout.numel for layout in summary.owners.values())
    lines += [
        "",
        f"clustered layers: {len(summary.owners)} ({clustered:,} weights) in {summary.clustered_bytes:,} bytes",
        f"checkpoint: {total:,} bytes ({human_bytes(total)}) of tensors in {len(summary.files)} file(s), "
        f"{sum(os.path.getsize(f) for f in summary.files):,} bytes with their headers",
        f"dense fp32: {fp32:,} bytes ({human_bytes(fp32)}), compression {fp32 / total:.2f}x",
        f"dense fp16: {fp16:,} bytes ({human_bytes(fp16)}), compression {fp16 / total:.2f}x",
    ]
    if flagged:
        lines.append(f"{flagged} layer(s) DAMAGED: their stored values cannot be what dkm_hf wrote")
    return "\n".join(lines), flagged


def _original_weight(directory: str, name: str) -> torch.Tensor | None:
    key = f"{name}.weight"
    for path in checkpoint_files(directory):
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            match = next((k for k in keys if k == key or k.endswith("." + key) or key.endswith("." + k)), None)
            if match is not None:
                return f.get_tensor(match).float()
    return None


def plot(directory: str, out: str, layers: str | None = None, original: str | None = None) -> list[str]:
    """Histogram per chosen layer: original weights (if given) or the decoded weights, with LUT centroids marked.

    With per-channel scales the LUT lives in scaled units, so the weights are divided by their channel's scale.
    With cluster_dim > 1 every centroid component is marked. Returns the plotted layer names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if os.path.isdir(out) or out.endswith(("/", os.sep)) or not os.path.splitext(os.path.basename(out))[0]:
        raise ValueError(f"--out {out!r} is a folder, not a file name (e.g. {os.path.join(out, 'plot.png')})")
    summary = load_summary(directory)
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as err:
        raise ValueError(f"--layers {layers!r} is not a valid regex ({err})") from None
    chosen = [n for n in summary.owners if pattern is None or pattern.search(n)]
    if not chosen:
        raise PalettizedCheckpointError(f"no palettized layer matches {layers!r}")
    if len(chosen) > MAX_PLOTS:
        print(f"dkm-hf plot: {len(chosen)} layers match, plotting the first {MAX_PLOTS} (narrow them with --layers)")
        chosen = chosen[:MAX_PLOTS]
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, logging.tqdm(chosen, desc="dkm-hf: plotting", delay=2.0, leave=False)):
        layout: Layout = summary.layouts[name]
        lut = _tensor(summary, name, "weight_lut").float()
        scale = _tensor(summary, name, "weight_scale")
        dense = _original_weight(original, name) if original else None
        if dense is not None and dense.numel() == layout.numel:
            if scale is not None:
                dense = layout.to_rows(dense) / scale.float()
            values, weights, label = dense.reshape(-1).numpy(), None, "original"
        else:  # each LUT value as often as the weights use it
            counts = entry_counts(summary, name).repeat_interleave(layout.cluster_dim)
            used = counts > 0
            values, weights, label = lut.reshape(-1)[used].numpy(), counts[used].numpy(), "palettized"
        ax.hist(values, bins=120, weights=weights, color="tab:blue", alpha=0.7, label=label)
        for c in lut.reshape(-1).unique().tolist():
            ax.axvline(c, color="tab:red", linewidth=0.6, alpha=0.6 if layout.groups == 1 else 0.25)
        unit = " / channel scale" if scale is not None else ""
        ax.set_title(f"{name}\n{layout.bits} bits, d={layout.cluster_dim}, {layout.groups} LUT(s)", fontsize=8)
        ax.set_xlabel(f"weight{unit}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format=Path(out).suffix[1:] or "png")  # no suffix: the name as given, a PNG
    plt.close(fig)
    return chosen


def example_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the `--example-shape NAME=D1xD2...` arguments."""
    sizes = {}
    for spec in specs or ():
        name, _, dims = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", dims):
            raise ValueError(f"--example-shape {spec!r} is not NAME=D1xD2... (e.g. input_ids=1x128)")
        sizes[name] = tuple(int(d) for d in dims.split("x"))
    return sizes


def example_inputs(config, sizes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of these shapes, or input_ids (1, 128) for a text model and pixel_values (1, channels, size, size)
    for a vision one. Token ids lie below the vocabulary size; masks are ones, other ids zeros."""
    vocab, image = getattr(config, "vocab_size", None), getattr(config, "image_size", None)
    if not sizes and vocab:
        sizes = {"input_ids": (1, min(128, getattr(config, "max_position_embeddings", None) or 128))}
    elif not sizes and image:
        side = image if isinstance(image, int) else image[0]
        sizes = {"pixel_values": (1, getattr(config, "num_channels", 3), side, side)}
    elif not sizes:
        raise ValueError("cannot guess the model's inputs: give --example-shape NAME=D1xD2...")
    positions = getattr(config, "max_position_embeddings", None)
    for name, size in sizes.items():
        if isinstance(positions, int) and _is_token_input(name) and len(size) == 2 and size[1] > positions:
            raise ValueError(
                f"--example-shape {name}={'x'.join(map(str, size))}: {size[1]} tokens, more than the model's "
                f"max_position_embeddings ({positions})"
            )
    g = torch.Generator().manual_seed(0)
    made = {}
    for name, size in sizes.items():
        if name == "input_ids":
            made[name] = torch.randint(0, vocab or 2, size, generator=g)
        elif _is_token_input(name):
            made[name] = (torch.ones if name.endswith("_mask") else torch.zeros)(size, dtype=torch.long)
        else:
            made[name] = torch.randn(size, generator=g)
    return made


def _is_token_input(name: str) -> bool:
    """Whether an input holds one value per token (ids or a mask), as opposed to pixels or embeddings."""
    return name.endswith("_ids") or name.endswith("_mask")


def export(args) -> None:
    if args.format is None:
        raise ValueError("choose the format: --coreml")
    sizes = example_shapes(args.example_shape)
    coreml_target(args.target)
    try:  # the example inputs are checked against config.json before the model loads
        from transformers import AutoConfig

        example_inputs(AutoConfig.from_pretrained(args.directory), sizes)
    except (OSError, KeyError, TypeError):
        pass  # not a readable checkpoint: load_palettized says what is wrong
    model = load_palettized(args.directory)
    inputs = example_inputs(model.config, sizes)
    shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in inputs.items())
    try:
        mlmodel = to_coreml(model, inputs, args.out, args.target)
    except RuntimeError as err:  # raised by torch.export while tracing the model on these inputs
        raise ValueError(f"{type(model).__name__} cannot run on the example inputs ({shapes}): {err}") from None
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(
        f"wrote {args.out} ({size:,} bytes, {human_bytes(size)}): {ops.count('constexpr_lut_to_dense')} "
        f"constexpr_lut_to_dense, {ops.count('constexpr_blockwise_shift_scale')} constexpr_blockwise_shift_scale; "
        f"inputs {shapes}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dkm-hf", description="Inspect and export DKM palettized checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="per-layer table and totals of a palettized checkpoint")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print the totals as JSON after the table")
    draw = commands.add_parser("plot", help="weight histograms with the LUT centroids marked")
    draw.add_argument("directory")
    draw.add_argument("--out", required=True, help="PNG file to write")
    draw.add_argument("--layers", default=None, help="regex (re.search) over module names")
    draw.add_argument("--original", default=None, help="directory of the dense model the checkpoint came from")
    out = commands.add_parser("export", help="a palettized checkpoint as a Core ML package holding its own LUTs")
    out.add_argument("--coreml", dest="format", action="store_const", const="coreml", help="write an .mlpackage")
    out.add_argument("directory")
    out.add_argument("out", help="the .mlpackage to write")
    out.add_argument("--example-shape", action="append", metavar="NAME=D1xD2", help="an input and its fixed shape")
    out.add_argument("--target", default="iOS18", help="coremltools minimum_deployment_target (default iOS18)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export(args)
            return 0
        if args.command == "inspect":
            summary = load_summary(args.directory)
            table, flagged = inspect_table(summary)
            print(table)
            if args.json:
                totals = {
                    "checkpoint_bytes": summary.total_bytes,
                    "dense_fp32_bytes": summary.dense_bytes(4),
                    "dense_fp16_bytes": summary.dense_bytes(2),
                    "damaged_layers": flagged,
                }
                print(json.dumps(totals))
            return 1 if flagged else 0
        names = plot(args.directory, args.out, args.layers, args.original)
        print(f"wrote {args.out} ({len(names)} layer(s))")
    except (ValueError, OSError, SafetensorError, ImportError, NotImplementedError) as err:
        # PalettizedCheckpointError is a ValueError; ImportError: no coremltools; NotImplementedError: an op
        # coremltools cannot convert
        message = " ".join(str(err).split())
        if isinstance(err, ImportError) and args.command == "export":
            message = f"{message} (pip install 'dkm_hf[coreml]')"
        print(f"dkm-hf {args.command}: {args.directory}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
