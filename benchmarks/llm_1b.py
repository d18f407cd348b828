"""A 1B-class decoder end to end on CPU: a randomly initialised Llama of Llama-3.2-1B's shape, bf16, per-row 4 bits.

    BENCH_THREADS=2 python benchmarks/llm_1b.py [--steps 3] [--batch 1 --seq 256] [--rounds 1] [--layers 16]

No 1B weights ship offline; time and memory do not depend on the values, so the model is built from Llama-3.2-1B's
configuration (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocabulary 128,256, tied embeddings:
1.24B parameters) with random weights and saved once in bf16 under the benchmark cache. Two kinds of fresh process,
alternating: plain fine-tuning (load, --steps AdamW steps after a first one) and DKM (load with the causal-LM
example's recipe: per-row 4-bit LUTs for every Linear, the tied embedding at 8 bits per tensor, one DKM iteration,
the best of 4 k-means runs; then the same steps, then `palettize` and `save_pretrained`). Printed side by side: load
(+ k-means) time, median step, peak RSS (the process's VmHWM, weights included), the palettized checkpoint's size and
its save time, and the DKM / plain ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import CACHE, outcome  # noqa: E402
from measure import CHILD_THREADS, emit, markdown_table, median, progress, run_child, warm_up_torch  # noqa: E402
from suite_model import LLM_RECIPE  # noqa: E402

LLAMA_32_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
RECIPE = LLM_RECIPE | {"kmeans_restarts": 4}


def model_dir(layers: int) -> Path:
    """The random bf16 model, built and saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = CACHE / f"random-llama-3.2-1b-shape-{layers}-layers"
    if not (target / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(**(LLAMA_32_1B | {"num_hidden_layers": layers}))
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
        model.save_pretrained(target)
    return target


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import dkm_hf

    warm_up_torch()
    torch.manual_seed(0)
    start = time.perf_counter()
    kwargs = {"dtype": torch.bfloat16}
    if spec["dkm"]:
        kwargs["dkm_config"] = dkm_hf.DKMConfig(**RECIPE)
    model = AutoModelForCausalLM.from_pretrained(spec["path"], **kwargs)
    load_s = time.perf_counter() - start
    progress(f"loaded in {load_s:.0f} s")
    params = sum(p.numel() for p in model.parameters())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(
        5, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for _ in range(spec["steps"] + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        progress(f"step {len(times)} took {times[-1]:.1f} s (load {load_s:.0f} s)")
    result = {"params": params, "load_s": load_s, "first_s": times[0], "step_s": median(times[1:])}
    result["peak_training_mb"] = vm_hwm_mb()
    if spec["dkm"]:
        del optimizer
        out = Path(spec["out"])
        t = time.perf_counter()
        dkm_hf.palettize(model).save_pretrained(out)
        result["save_s"] = time.perf_counter() - t
        result["checkpoint_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    result["peak_mb"] = vm_hwm_mb()
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps after the first one")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="plain / DKM pairs")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: Llama-3.2-1B)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    path = model_dir(args.layers)
    runs, results = [], {"plain": [], "dkm": []}
    for _ in range(args.rounds):
        for kind in ("plain", "dkm"):
            spec = {"path": str(path), "dkm": kind == "dkm", "steps": args.steps, "batch": args.batch}
            spec |= {"seq": args.seq, "out": str(CACHE / "llm_1b_palettized")}
            res = run_child([__file__, "--child", json.dumps(spec)], args.timeout)
            runs.append({"kind": kind, "spec": spec, "result": res})
            print(kind, outcome(res) or {k: round(v, 2) for k, v in res.items() if k != "status"}, flush=True)
            if res["status"] == "ok":
                results[kind].append(res)
    if not (results["plain"] and results["dkm"]):
        sys.exit("a run did not finish")
    keys = ("load_s", "first_s", "step_s", "peak_training_mb")
    p, d = ({k: median([r[k] for r in results[kind]]) for k in keys} for kind in ("plain", "dkm"))
    rows = [
        ["load (+ k-means for DKM), s", p["load_s"], d["load_s"], d["load_s"] / p["load_s"]],
        ["first step, s", p["first_s"], d["first_s"], d["first_s"] / p["first_s"]],
        ["median step, s", p["step_s"], d["step_s"], d["step_s"] / p["step_s"]],
        [
            "peak RSS while training, MB",
            p["peak_training_mb"],
            d["peak_training_mb"],
            d["peak_training_mb"] / p["peak_training_mb"],
        ],  # fmt: skip
        ["palettized save, s", None, median([r["save_s"] for r in results["dkm"]]), None],
        ["palettized checkpoint, MB", None, median([r["checkpoint_mb"] for r in results["dkm"]]), None],
        ["peak RSS including the save, MB", None, median([r["peak_mb"] for r in results["dkm"]]), None],
    ]
    params = results["plain"][0]["params"]
    print(f"\nRandom Llama of Llama-3.2-1B's shape ({params / 1e9:.2f}B parameters, {args.layers} layers), bf16, "
          f"batch {args.batch} x {args.seq}, AdamW, {CHILD_THREADS} threads; DKM {json.dumps(RECIPE)}\n")  # fmt: skip
    print(markdown_table(["", "plain fine-tuning", "DKM", "DKM / plain"], rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": CHILD_THREADS, "recipe": RECIPE, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
