"""Run by tests/ops/test_fused.py in a fresh process with TRITON_INTERPRET=1: the Triton kernels on CPU tensors
against the chunked torch path, on small shapes (the interpreter runs each program in numpy)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from reference import weights  # noqa: E402

from dkm_hf.ops import fused, fused_triton  # noqa: E402
from dkm_hf.ops.dkm import dkm_cluster  # noqa: E402
from dkm_hf.ops.kmeans import kmeans_init  # noqa: E402

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(groups: int, n: int, d: int, bits: int, epsilon_scale: float, weighted: bool = False) -> None:
    w = weights(groups, n, d)
    c0 = kmeans_init(w, 2**bits, seed=0) * 1.5
    var = (w - w.mean(1, keepdim=True)).square().sum(-1).mean(1)
    tau, epsilon = 0.01 * var, 1e-3 * var.sqrt() * epsilon_scale
    grad = torch.randn_like(w)
    # importance over four orders of magnitude, as squared gradients are
    f = 10 ** (4 * torch.rand(groups, n, generator=torch.Generator().manual_seed(1)) - 2) if weighted else None
    x = w.clone().requires_grad_()
    y_ref, c_ref = dkm_cluster(x, c0, tau, 4, epsilon, "chunked", importance=f)
    (y_ref * grad).sum().backward()
    out, c_final, history, masses, T = fused_triton.forward(
        w, c0, fused.per_group(tau, groups, w.device), fused.per_group(epsilon, groups, w.device), 4, f
    )
    g = fused_triton.backward(w, grad, history, masses, T, fused.per_group(tau, groups, w.device), f)
    errors = (_rel(out, y_ref.detach()), _rel(c_final, c_ref), _rel(g, x.grad))
    shape = f"G={groups} n={n} d={d} bits={bits} eps x{epsilon_scale:g} weighted={weighted}"
    print(f"{shape} T={int(T)}: rel. errors {errors}")
    assert max(errors) < 1e-4, errors


for args in [(1, 200, 1, 4, 0.0), (5, 37, 1, 3, 0.0), (3, 50, 1, 1, 300.0), (2, 40, 2, 2, 0.0), (4, 33, 1, 8, 1e9)]:
    check(*args)
for args in [(5, 37, 1, 3, 0.0), (2, 40, 2, 2, 0.0), (3, 50, 1, 4, 300.0)]:
    check(*args, weighted=True)
print("ok")
