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


def check(
    groups: int,
    n: int,
    d: int,
    bits: int,
    epsilon_scale: float,
    weighted: bool = False,
    iters: int = 4,
    dtype=None,
    tau_ratio: float = 0.01,
) -> None:
    w = weights(groups, n, d) if dtype is None else weights(groups, n, d).to(dtype).float()  # representable
    c0 = kmeans_init(w, 2**bits, seed=0) * 1.5
    var = (w - w.mean(1, keepdim=True)).square().sum(-1).mean(1)
    tau, epsilon = tau_ratio * var, 1e-3 * var.sqrt() * epsilon_scale
    grad = torch.randn_like(w) if dtype is None else torch.randn_like(w).to(dtype).float()
    # importance over four orders of magnitude, as squared gradients are
    f = 10 ** (4 * torch.rand(groups, n, generator=torch.Generator().manual_seed(1)) - 2) if weighted else None
    x = w.clone().requires_grad_()
    y_ref, c_ref = dkm_cluster(x, c0, tau, iters, epsilon, "chunked", importance=f)
    (y_ref * grad).sum().backward()
    wt, gt = (w, grad) if dtype is None else (w.to(dtype), grad.to(dtype))  # 16-bit: w and grad as given
    meta, nb = fused_triton._geometry(wt, 2**bits)
    path = "one launch" if fused_triton.one_launch(groups, nb, iters) else "per block"
    out, c_final, history, masses, T = fused_triton.forward(
        wt, c0, fused.per_group(tau, groups, w.device), fused.per_group(epsilon, groups, w.device), iters, f
    )
    g = fused_triton.backward(wt, gt, history, masses, T, fused.per_group(tau, groups, w.device), f)
    assert out.dtype == g.dtype == wt.dtype
    errors = (_rel(out.float(), y_ref.detach()), _rel(c_final, c_ref), _rel(g.float(), x.grad))
    shape = f"G={groups} n={n} d={d} bits={bits} eps x{epsilon_scale:g} weighted={weighted} iters={iters} {dtype}"
    shape += f" tau {tau_ratio:g} x var"
    print(f"{shape} ({path}) T={int(T)}: rel. errors {errors}")
    # float32: the same sums in another order; 16-bit: W~ and the gradient rounded to the dtype (and grad's rounding)
    assert max(errors) < (1e-4 if dtype is None else 2 * torch.finfo(dtype).eps), errors


for args in [(1, 200, 1, 4, 0.0), (5, 37, 1, 3, 0.0), (3, 50, 1, 1, 300.0), (2, 40, 2, 2, 0.0), (4, 33, 1, 8, 1e9)]:
    check(*args)
for args in [(5, 37, 1, 3, 0.0), (2, 40, 2, 2, 0.0), (3, 50, 1, 4, 300.0)]:
    check(*args, weighted=True)
# one iteration: a program per group (over one block and over several), and the per-block path of long groups
for args in [(5, 37, 1, 3, 0.0), (2, 40, 2, 2, 0.0), (3, 1300, 1, 4, 0.0), (1, 3000, 1, 4, 0.0), (300, 20, 1, 1, 0.0)]:
    check(*args, iters=1)
check(3, 1300, 1, 4, 0.0, weighted=True, iters=1)
check(4, 600, 1, 4, 0.0, iters=1, dtype=torch.bfloat16)
check(1, 3000, 1, 4, 0.0, iters=1, dtype=torch.float16)
# a small tau: each weight's attention is its nearest centroid's (the softmax backward taken relative to it)
for tau_ratio in (1e-4, 1e-8):
    check(5, 37, 1, 4, 0.0, iters=1, tau_ratio=tau_ratio)
    check(3, 50, 1, 3, 0.0, weighted=True, iters=2, tau_ratio=tau_ratio)
print("ok")
