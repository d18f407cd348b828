"""A naive autograd DKM, written straight from the paper, to check the fast paths against; test weights."""

from __future__ import annotations

import torch


def naive_dkm(w: torch.Tensor, c0: torch.Tensor, tau: float, max_iters: int, epsilon: float, importance=None):
    """W~ = A C by autograd, straight from the definitions; `importance` (G, n): each vector's weight f in the
    centroid update C = A^T (f w) / A^T f."""
    c = c0.detach()
    a = None
    f = torch.ones(w.shape[:2], dtype=w.dtype) if importance is None else importance.to(w.dtype)
    for _ in range(max_iters):
        dist = (w.unsqueeze(2) - c.unsqueeze(1)).square().sum(-1)
        a = torch.softmax(-dist / tau, dim=-1)
        fa = a * f.unsqueeze(-1)
        c_new = (fa.transpose(1, 2) @ w) / fa.sum(1).unsqueeze(-1)
        moved = (c_new - c).abs().max().item()
        c = c_new
        if moved <= epsilon:
            break
    return a @ c, c.detach()


def weights(groups: int, n: int, d: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian weights (std 0.05) with a few outliers, as in real layers; float16-representable for d = 1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, n, d, generator=g, dtype=torch.float64) * 0.05
    w[:, :3] *= 8
    return w.to(torch.float16).to(dtype) if d == 1 else w.to(dtype)


def naive_kmeans_1d(w: torch.Tensor, u: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """k-means of each group of w (G, n, 1), dense, straight from the definitions: k-means++ draw j takes the value
    where the cumulative D^2 of the sorted values first exceeds u[..., j] times its total (the first draw, and any
    draw with every value on a centroid, takes value floor(u n)); Lloyd by argmin until no assignment changes; of
    the restarts u (G, r, k), the lowest inertia. -> (G, k, 1) sorted, float64."""
    x = w.squeeze(-1).double().sort(1).values.unsqueeze(1).expand(-1, u.shape[1], -1)  # (G, r, n)
    n, k = x.shape[-1], u.shape[-1]
    c = x.gather(-1, (u[..., :1] * n).long())
    for j in range(1, k):
        d2 = (x.unsqueeze(-1) - c.unsqueeze(-2)).square().amin(-1)
        cum = d2.cumsum(-1)
        index = torch.searchsorted(cum, u[..., j : j + 1] * cum[..., -1:], right=True).clamp(max=n - 1)
        index = torch.where(cum[..., -1:] <= 0, (u[..., j : j + 1] * n).long(), index)
        c = torch.cat([c, x.gather(-1, index)], -1)
    previous = None
    for _ in range(iters + 1):
        assign = (x.unsqueeze(-1) - c.unsqueeze(-2)).abs().argmin(-1)
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        one_hot = torch.nn.functional.one_hot(assign, k).double()
        mass, sums = one_hot.sum(-2), (one_hot * x.unsqueeze(-1)).sum(-2)
        c = torch.where(mass > 0, sums / mass.clamp_min(1e-30), c)
    inertia = (x - c.gather(-1, assign)).square().sum(-1)
    best = c[torch.arange(c.shape[0]), inertia.argmin(1)]
    return best.sort(-1).values.unsqueeze(-1)
