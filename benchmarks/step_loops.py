"""The per-weight loops around the DKM kernel on SmolLM2-135M's shapes: C++ loops against the torch steps they replace.

    python benchmarks/step_loops.py [--threads 1 2] [--rounds 3] [--reps 3]

- "embedding fwd+bwd": the uniquified path of SmolLM2's 49152 x 576 embedding (one 8-bit per-tensor LUT, float32):
  weights keyed by their 16-bit patterns (dkm_buckets.cpp) against `unique_buckets`' inverse and torch's gathers and
  scatters (the baseline: the same code with the CPU extension switched off).
- "nearest centroid": `hard_assign` (cluster health, re-seeding, palettization) of that embedding (256 centroids) and
  of one per-row 4-bit 1536 x 576 MLP matrix: the C++ loop against the torch binary search.
- "per-row variance" (tau of every step, 1536 x 576 per-row LUTs): the centred norm against torch.var.

Baseline and candidate run in alternating fresh processes with OMP_NUM_THREADS threads; each result is the median of
`reps` passes after one warm-up; the table holds the medians over `rounds` processes and their ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
from measure import alternate_seconds, emit, markdown_table, median  # noqa: E402

CASES = ("embedding fwd+bwd", "nearest centroid, embedding", "nearest centroid, 1536x576 per-row", "per-row variance")
VARIANTS = ("torch", "C++ / norm")  # baseline, candidate


def child(case: str, variant: str, reps: int) -> None:
    import torch

    from dkm_hf.nn.layout import group_variance
    from dkm_hf.ops import fused
    from dkm_hf.ops.attention import hard_assign
    from dkm_hf.ops.dkm import dkm_cluster

    if variant == "torch":
        fused.cpu_kernels = lambda: None  # the steps the C++ loops replace
    g = torch.Generator().manual_seed(0)
    embedding = case.endswith("embedding") or case.startswith("embedding")
    rows, cols, k = (49152, 576, 256) if embedding else (1536, 576, 16)
    groups = 1 if embedding else rows
    w = (torch.randn(rows * cols, generator=g) * 0.05).view(groups, -1, 1)
    sorted_w = w[..., 0].sort(1).values
    c = sorted_w[:, ((torch.arange(k) + 0.5) / k * w.shape[1]).long()].unsqueeze(-1).contiguous()  # quantiles
    if case == "embedding fwd+bwd":
        grad = torch.randn(w.shape, generator=g)
        tau = torch.full((1,), 0.01) * w.var()

        def step() -> None:
            x = w.clone().requires_grad_()
            (dkm_cluster(x, c, tau, 1, 0.0, "uniquified")[0] * grad).sum().backward()

    elif case.startswith("nearest"):

        def step() -> None:
            hard_assign(w, c)

    else:
        if variant == "torch":

            def step() -> None:
                torch.var(w, dim=1, correction=0).sum(-1)

        else:

            def step() -> None:
                group_variance(w)

    times = [measure.timed(step) for _ in range(reps + 1)]
    emit({"seconds": median(times[1:])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.reps)
        return
    table = []
    for case in CASES:
        for threads in args.threads:
            measure.CHILD_THREADS = threads
            argv_of = lambda name: [__file__, "--child", case, name, "--reps", str(args.reps)]  # noqa: E731
            results = alternate_seconds(argv_of, VARIANTS, args.rounds, 1800, case)
            base, cand = (median(results[name]) for name in VARIANTS)
            table.append([case, threads, base * 1e3, cand * 1e3, base / cand])
            print(f"{case} x{threads}: {results}", flush=True)
    print(f"\nmedians of {args.rounds} fresh processes (each the median of {args.reps} passes), float32\n")
    print(markdown_table(["case", "threads", "torch (ms)", "C++ / norm (ms)", "torch / candidate"], table))


if __name__ == "__main__":
    main()
