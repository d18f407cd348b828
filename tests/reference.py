"""A naive autograd DKM, written straight from the paper, to check the fast paths against; test weights."""

from __future__ import annotations

import torch


def naive_dkm(w: torch.Tensor, c0: torch.Tensor, tau: float, max_iters: int, epsilon: float):
    c = c0.detach()
    a = None
    for _ in range(max_iters):
        dist = (w.unsqueeze(2) - c.unsqueeze(1)).square().sum(-1)
        a = torch.softmax(-dist / tau, dim=-1)
        c_new = (a.transpose(1, 2) @ w) / a.sum(1).unsqueeze(-1)
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
