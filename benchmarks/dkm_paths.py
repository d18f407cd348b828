"""Cost of one DKM training step on a 768x3072 Linear at 4 bits: naive autograd vs the chunked and uniquified paths.

    python benchmarks/dkm_paths.py [--quick]

Each variant runs in a fresh child process: median fwd+bwd step time (a batch of 64, SGD update of the weight so
every step sees a new weight) and the peak RSS increase over the RSS right before the first step. Then a sweep over
weight counts finds where the uniquified path (attention per distinct float16 value) starts beating the exact
chunked path for cluster_dim 1. Writes benchmarks/results/dkm_paths.json and benchmarks/results/dkm_paths.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure import emit, markdown_table, median, reset_peak_rss, run_child, timed  # noqa: E402

BITS, OUT_FEATURES, IN_FEATURES, BATCH = 4, 3072, 768, 64
TAU = 1e-4
# Every variant runs all its iterations: a tiny epsilon disables the early stop, so the paths do the same work.
EPSILON = 1e-12
VARIANTS = {
    "plain Linear": ("plain", 0),
    "naive autograd, 5 iters": ("naive", 5),
    "naive autograd, 3 iters": ("naive", 3),
    "chunked, 5 iters": ("chunked", 5),
    "chunked, 3 iters": ("chunked", 3),
    "uniquified, 5 iters": ("uniquified", 5),
    "uniquified, 3 iters": ("uniquified", 3),
}
SWEEP_SHAPES = [(32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (512, 512), (768, 768),
                (768, 1536), (768, 3072)]  # fmt: skip


def make_step(kind: str, iters: int, out_features: int, in_features: int, seed: int = 0):
    """A closure doing one fwd+bwd+SGD step of a Linear whose weight goes through `kind`."""
    import torch
    import torch.nn.functional as F

    from dkm_hf.ops.dkm import dkm_cluster
    from dkm_hf.ops.kmeans import kmeans_init
    from tests.reference import naive_dkm

    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    w = layer.weight
    x = torch.randn(BATCH, in_features)
    state = {"c": kmeans_init(w.detach().reshape(1, -1, 1), 2**BITS)}

    def step():
        if kind == "plain":
            weight = w
        else:
            vectors = w.reshape(1, -1, 1)
            if kind == "naive":
                soft, c = naive_dkm(vectors, state["c"], TAU, iters, EPSILON)
            else:
                soft, c = dkm_cluster(vectors, state["c"], TAU, iters, EPSILON, kind)
            state["c"] = c.detach()
            weight = soft.reshape(w.shape)
        loss = F.linear(x, weight, layer.bias).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.01 * p.grad
                p.grad = None

    return step


def child_variant(kind: str, iters: int, steps: int) -> None:
    step = make_step(kind, iters, OUT_FEATURES, IN_FEATURES)
    base = reset_peak_rss()
    first = timed(step)
    times = [timed(step) for _ in range(steps)]
    from measure import peak_rss_mb

    emit({"first_s": first, "step_s": median(times), "times": times, "peak_increase_mb": peak_rss_mb() - base})


def child_sweep(steps: int) -> None:
    rows = []
    for out_f, in_f in SWEEP_SHAPES:
        n = out_f * in_f
        reps = steps if n < 1 << 20 else max(3, steps // 2)
        chunked, uniq = make_step("chunked", 3, out_f, in_f), make_step("uniquified", 3, out_f, in_f)
        chunked(), uniq()  # warm-up
        tc, tu = [], []
        for _ in range(reps):  # alternate, so drifts of the shared machine hit both paths alike
            tc.append(timed(chunked))
            tu.append(timed(uniq))
        rows.append({"shape": [out_f, in_f], "weights": n, "chunked_s": median(tc), "uniquified_s": median(tu)})
        print(rows[-1], flush=True)
    emit({"sweep": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ITERS"), help=argparse.SUPPRESS)
    parser.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_variant(args.child[0], int(args.child[1]), args.steps)
    if args.sweep_child:
        return child_sweep(args.steps)

    from measure import machine_description

    script = str(Path(__file__).resolve())
    results = {}
    for label, (kind, iters) in VARIANTS.items():
        steps = (3 if args.quick else 5) if kind == "naive" else (5 if args.quick else 10)
        res = run_child([script, "--child", kind, str(iters), "--steps", str(steps)], timeout_s=600)
        results[label] = res
        print(label, {k: v for k, v in res.items() if k != "times"}, flush=True)
    sweep = run_child([script, "--sweep-child", "--steps", "5" if args.quick else "9"], timeout_s=900)

    plain = results["plain Linear"]
    rows = []
    for label, res in results.items():
        ok = res["status"] == "ok"
        iters = VARIANTS[label][1]
        ref = results.get(f"naive autograd, {iters} iters", {}) if iters else {}
        ref_ok = ref.get("status") == "ok" and ok
        rows.append([
            label,
            res["step_s"] * 1e3 if ok else res["status"],
            res["peak_increase_mb"] if ok else None,
            res["step_s"] / plain["step_s"] if ok and plain["status"] == "ok" else None,
            ref["step_s"] / res["step_s"] if ref_ok else None,
            ref["peak_increase_mb"] / max(res["peak_increase_mb"], 1.0) if ref_ok else None,
        ])  # fmt: skip
    table = markdown_table(
        ["variant", "median step (ms)", "peak RSS increase (MB)", "time vs plain", "naive/this time",
         "naive/this memory"], rows)  # fmt: skip

    sweep_rows, crossover = [], None
    for r in sweep.get("sweep", []):
        faster = r["uniquified_s"] < r["chunked_s"]
        if faster and crossover is None:
            crossover = r["weights"]
        elif not faster:
            crossover = None
        sweep_rows.append([f"{r['shape'][0]}x{r['shape'][1]}", r["weights"], r["chunked_s"] * 1e3,
                           r["uniquified_s"] * 1e3, r["chunked_s"] / r["uniquified_s"]])  # fmt: skip
    sweep_table = markdown_table(
        ["Linear (out x in)", "weights", "chunked (ms)", "uniquified (ms)", "chunked/uniquified"], sweep_rows
    )
    from dkm_hf.ops.dkm import UNIQUIFY_MIN_WEIGHTS

    summary = (
        f"Uniquified is faster from {crossover} weights on (every larger size in the sweep too); "
        f"dkm_hf.ops.dkm.UNIQUIFY_MIN_WEIGHTS = {UNIQUIFY_MIN_WEIGHTS}."
        if crossover
        else f"No stable crossover in the sweep; dkm_hf.ops.dkm.UNIQUIFY_MIN_WEIGHTS = {UNIQUIFY_MIN_WEIGHTS}."
    )
    if sweep.get("status") != "ok":
        summary = f"sweep did not complete: {sweep.get('status')}"
    md = (
        f"### DKM paths: Linear({IN_FEATURES}, {OUT_FEATURES}), {BITS} bits, cluster_dim 1, batch {BATCH}\n\n"
        f"fwd+bwd+SGD step, tau {TAU:g}, early stop disabled (all iterations run); one fresh process per row.\n\n"
        f"{table}\n\n### Chunked vs uniquified by weight count ({BITS} bits, 3 iterations)\n\n"
        f"{sweep_table}\n\n{summary}\n"
    )
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    command = "python benchmarks/dkm_paths.py" + (" --quick" if args.quick else "")
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(),
        "command": command,
        "variants": results,
        "sweep": sweep,
        "crossover_weights": crossover,
    }
    (out_dir / "dkm_paths.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "dkm_paths.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
