"""A/B of two git revisions of dkm_hf on the layer suite's dkm_hf runs: same specs, fresh processes, alternating.

    python benchmarks/ab_revisions.py --base REV [--candidate REV] [--rounds 3] [--quick] [--only 8/1 2/2]

Each revision is checked out once into a temporary git worktree; every variant of `suite_layer.layer_variants`
(dkm_hf only) runs `rounds` times per revision, alternating base and candidate, one thread per child (BENCH_THREADS).
Prints, per variant, the median step time, first step and peak RSS increase of both and their ratio (candidate /
base). The base revision must have the same child command line (`benchmarks/run.py --child layer <spec>`).
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

from measure import markdown_table, median, run_child  # noqa: E402
from suite_layer import layer_variants  # noqa: E402


def worktree(revision: str, root: Path) -> Path:
    path = root / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(path), revision], check=True)
    return path


def run(tree: Path, spec: dict) -> dict:
    return run_child([str(tree / "benchmarks" / "run.py"), "--child", "layer", json.dumps(spec)], timeout_s=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--candidate", default=None, help="a revision; default: the working tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the quick suite's variants")
    parser.add_argument("--only", nargs="+", default=None, help="variants as bits/cluster_dim, e.g. 8/1 2/2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": worktree(args.base, Path(tmp))}
        trees["candidate"] = worktree(args.candidate, Path(tmp)) if args.candidate else HERE.parent
        rows = []
        try:
            for variant in layer_variants(args.quick):
                if variant["impl"] != "dkm_hf" or (
                    args.only and f"{variant['bits']}/{variant['cluster_dim']}" not in args.only
                ):
                    continue
                spec = variant | {"steps": 3 if variant["cluster_dim"] > 1 else 10, "device": "cpu"}
                results = {"base": [], "candidate": []}
                for _ in range(args.rounds):
                    for side in ("base", "candidate"):
                        results[side].append(run(trees[side], spec))
                ok = {side: [r for r in rs if r.get("status") == "ok"] for side, rs in results.items()}
                stats = {
                    side: {key: median([r[key] for r in rs]) for key in ("step_s", "first_s", "peak_increase_mb")}
                    for side, rs in ok.items()
                }
                row = [f"{variant['bits']}/{variant['cluster_dim']}, {variant['iters']} it"]
                for key, scale in (("step_s", 1000), ("first_s", 1), ("peak_increase_mb", 1)):
                    b, c = stats["base"][key], stats["candidate"][key]
                    row += [b * scale if b else None, c * scale if c else None, c / b if b and c else None]
                rows.append(row)
                print(row, flush=True)
        finally:
            for side, tree in trees.items():
                if tree != HERE.parent:
                    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(tree)])
    header = ["bits/d, iters", "base step ms", "cand. step ms", "ratio", "base first s", "cand. first s", "ratio"]
    header += ["base peak MB", "cand. peak MB", "ratio"]
    print(f"\nbase {args.base}, candidate {args.candidate or 'working tree'}, {args.rounds} rounds, medians\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
