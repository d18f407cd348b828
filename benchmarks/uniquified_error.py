"""How far the uniquified DKM path is from the exact one for float32 weights (bucketed by their float16 rounding).

    python benchmarks/uniquified_error.py [--bits 4] [--layers 6]

For the first --layers clustered weights of all-MiniLM-L6-v2 (float32), one DKM forward and backward with the
default relative tau (0.01 x the weight's variance), 3 iterations, from k-means centroids, through both paths;
prints the relative error (||uniquified - chunked|| / ||chunked||) of the soft weight and of the weight gradient
for a random upstream gradient. For bf16 / fp16 weights the two paths agree to float rounding (the 16-bit value is
the bucket), which tests/ops check.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import minilm_path
from transformers import AutoModel

from dkm_hf import DKMConfig
from dkm_hf.ops.dkm import dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(minilm_path())
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and p.numel() >= 8192][: args.layers]
    tau_rel = DKMConfig(bits=args.bits).settings_for("").tau  # the default relative tau of that bit width
    rows = []
    for name, p in weights:
        w = p.detach().float().reshape(1, -1, 1)
        c0 = kmeans_init(w, 2**args.bits, seed=0)
        tau = tau_rel * w.var().item()
        grad = torch.randn_like(w)
        out = {}
        for impl in ("chunked", "uniquified"):
            x = w.clone().requires_grad_()
            y, _ = dkm_cluster(x, c0, tau, 3, 0.0, impl)
            (y * grad).sum().backward()
            out[impl] = (y.detach(), x.grad)
        rel = [((u - c).norm() / c.norm()).item() for c, u in zip(out["chunked"], out["uniquified"])]
        rows.append((name, p.numel(), *rel))
        print(f"{name:55s} {p.numel():>10,d}  soft weight {rel[0]:.2e}  gradient {rel[1]:.2e}", flush=True)
    print(
        f"median over {len(rows)} weights, {args.bits} bits: soft weight {statistics.median(r[2] for r in rows):.2e}, "
        f"gradient {statistics.median(r[3] for r in rows):.2e}"
    )


if __name__ == "__main__":
    main()
