"""The fused kernels' accuracy check, shared by the CPU tests (tests/ops/test_fused.py) and the CUDA ones.

The fused kernels and the chunked torch path compute the same float32 expressions in another summation order with
another exp, and neither is the exact result; so the chunked path run in float64 is the ground truth, and a fused
kernel's error must stay within FACTOR times the float32 chunked path's own error, plus FLOOR (a few float32 ulps,
for cases where that error happens to be tiny): the kernel is as accurate as the path it replaces. That error is
itself one draw of a rounding error that depends on the order of the sums (over ORDERS orders of the same vectors it
spreads over 5x and more, and which order a CPU's vector width gives is a matter of the machine), so the measure is
the largest of the chunked path's errors over ORDERS orders of the vectors in each group (DKM does not depend on
that order: the results are permuted back).
"""

from __future__ import annotations

import torch

from dkm_hf.ops.dkm import dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init

FACTOR, FLOOR = 4.0, 2e-6
ORDERS = 3  # the vectors' own order and two permutations


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def settings(w: torch.Tensor, tau_scale: str, tau_ratio: float = 0.01) -> tuple:
    """(tau, epsilon) as the modules make them: per-group tensors for tau_scale="variance" (tau = tau_ratio times the
    group's variance)."""
    if tau_scale == "absolute":
        return 1e-3, 1e-4
    var = (w - w.mean(1, keepdim=True)).square().sum(-1).mean(1).double()
    return tau_ratio * var, 1e-3 * var.sqrt()


def run(w, c0, tau, epsilon, iters, implementation, grad, importance=None, device="cpu"):
    """(W~, C_T, dL/dw) of dkm_cluster on `device` for the loss sum(W~ * grad), back on the CPU."""

    def to(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    x = w.to(device, copy=True).requires_grad_()
    y, c = dkm_cluster(x, to(c0), to(tau), iters, to(epsilon), implementation, importance=to(importance))
    (y * to(grad)).sum().backward()
    return y.detach().cpu(), c.cpu(), x.grad.cpu()


def importance_of(w: torch.Tensor) -> torch.Tensor:
    """Sample weights (G, n) over four orders of magnitude, as squared gradients are."""
    return 10 ** (4 * torch.rand(w.shape[:2], generator=torch.Generator().manual_seed(7), dtype=torch.float64) - 2)


def assert_as_accurate_as_reference(
    w,
    bits,
    iters,
    epsilon_scale=1.0,
    tau_scale="variance",
    seed=0,
    c0_scale=1.0,
    weighted=False,
    device="cpu",
    tau_ratio=0.01,
):
    """The fused kernel on `device` against the chunked float32 path on the CPU, both measured from float64."""
    c0 = kmeans_init(w, 2**bits, seed=seed) * c0_scale
    tau, epsilon = settings(w, tau_scale, tau_ratio)
    epsilon = epsilon * epsilon_scale
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    f = importance_of(w) if weighted else None
    truth = run(w.double(), c0.double(), tau, epsilon, iters, "chunked", grad.double(), f)
    tau32, eps32, f32 = (x.float() if isinstance(x, torch.Tensor) else x for x in (tau, epsilon, f))
    got = run(w, c0, tau32, eps32, iters, "fused", grad, f32, device=device)
    refs = []
    for order in range(ORDERS):
        p = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(order)) if order else slice(None)
        y, c, g = run(w[:, p], c0, tau32, eps32, iters, "chunked", grad[:, p], None if f32 is None else f32[:, p])
        if order:
            back = p.argsort()
            y, g = y[:, back], g[:, back]
        refs.append((y, c, g))
    for i, name in enumerate(("soft weight", "centroids", "gradient")):
        assert got[i].dtype == refs[0][i].dtype and got[i].shape == refs[0][i].shape
        err_ref, err_got = max(rel(r[i], truth[i]) for r in refs), rel(got[i], truth[i])
        assert err_got <= FACTOR * err_ref + FLOOR, f"{name}: fused {err_got:.3g}, float32 reference {err_ref:.3g}"
