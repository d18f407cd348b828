"""The fused DKM kernel against its reference (the chunked torch path) on SmolLM2-135M-like per-row layers.

    python benchmarks/fused_kernels.py [--layers 576x576 1536x576 576x1536 49152x576] [--threads 1 2] [--rounds 3]
                                       [--bits 4] [--iters 3] [--reps 3] [--importance]

Each layer is a per-row LUT (one LUT of 2**bits centroids per output row, cluster_dim 1, float32), clustered with
tau_scale="variance" (tau = 0.01 x the row's variance) and early stop disabled (all `iters` iterations run). One
measurement is the median of `reps` forward+backward passes of `dkm_cluster` (after one warm-up pass) in a fresh
process with OMP_NUM_THREADS threads; baseline (chunked) and candidate (fused) alternate, `rounds` times each.
Prints, per layer and thread count, the median over rounds of both and their ratio (the machine is shared: ratios
and medians).

With --importance both run the importance-weighted loop (`dkm_cluster(importance=)`, sample weights spread over four
orders of magnitude, as squared gradients are), and the fused kernel's plain loop runs alongside as a third column:
what the weighting costs in the kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402
from measure import alternate_seconds, emit, markdown_table, median  # noqa: E402

IMPLEMENTATIONS = ("chunked", "fused")  # baseline, candidate
WEIGHTED = ("chunked+importance", "fused+importance", "fused")  # baseline, candidate, the kernel's plain loop


def child(layer: str, variant: str, bits: int, iters: int, reps: int) -> None:
    import torch

    from dkm_hf.ops.dkm import dkm_cluster

    rows, cols = (int(x) for x in layer.split("x"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, 1, generator=g) * 0.02
    quantiles = (torch.arange(2**bits, dtype=torch.float32) + 0.5) / 2**bits
    c0 = torch.quantile(w[..., 0], quantiles, dim=1).T.contiguous().unsqueeze(-1)  # (rows, k, 1)
    var = w.var(1).view(-1)
    tau = 0.01 * var
    grad = torch.randn(w.shape, generator=g)
    implementation, _, weighted = variant.partition("+")
    f = 10 ** (4 * torch.rand(rows, cols, generator=g) - 2) if weighted else None

    def step() -> None:
        x = w.clone().requires_grad_()
        (dkm_cluster(x, c0, tau, iters, 0.0, implementation, importance=f)[0] * grad).sum().backward()

    times = [measure.timed(step) for _ in range(reps + 1)]
    emit({"seconds": median(times[1:]), "first_s": times[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["576x576", "1536x576", "576x1536", "49152x576"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--importance", action="store_true", help="the importance-weighted loop (and the plain fused)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--child", nargs=2, metavar=("LAYER", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.bits, args.iters, args.reps)
        return
    names = WEIGHTED if args.importance else IMPLEMENTATIONS
    table = []
    for layer in args.layers:
        for threads in args.threads:
            measure.CHILD_THREADS = threads
            options = ["--bits", str(args.bits), "--iters", str(args.iters), "--reps", str(args.reps)]
            argv_of = lambda name: [__file__, "--child", layer, name, *options]  # noqa: E731
            results = alternate_seconds(argv_of, names, args.rounds, args.timeout, layer)
            times = [median(results[name]) for name in names]
            row = [layer, threads, *(t * 1e3 for t in times), times[0] / times[1]]
            table.append(row + ([times[1] / times[2]] if args.importance else []))
            print(f"{layer} x{threads}: " + ", ".join(f"{name} {results[name]}" for name in names), flush=True)
    print(f"\n{args.bits} bits per-row LUTs, {args.iters} iterations, float32, fwd+bwd of dkm_cluster; medians of "
          f"{args.rounds} fresh processes (each the median of {args.reps} passes)\n")  # fmt: skip
    headers = ["layer (rows x cols)", "threads", *(f"{name} (ms)" for name in names), f"{names[0]} / {names[1]}"]
    print(markdown_table(headers + ([f"{names[1]} / {names[2]}"] if args.importance else []), table))


if __name__ == "__main__":
    main()
