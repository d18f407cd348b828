"""Initial centroids: weighted k-means++ seeding then Lloyd iterations, batched over LUT groups.

A quantile-initialised Lloyd leaves outliers without a centroid; k-means++ (D^2 sampling) does not. For d = 1 the
k-means runs on the histogram of distinct 16-bit values (weighted by their counts), so its cost does not grow with
the number of weights.
"""

from __future__ import annotations

import torch

from .attention import CHUNK_ELEMENTS, hard_assign
from .buckets import bucket_dtype_for, unique_buckets

_TINY = 1e-30


def _weighted_kmeans(x, weight, k, generator, lloyd_iters):
    """k-means++ seeding then Lloyd, batched over groups. x (G, R, d), weight (G, R) >= 0 -> (G, k, d)."""
    G, R, d = x.shape
    rows = torch.arange(G, device=x.device)
    probs = weight.double() + 1e-300
    first = torch.multinomial(probs.float() + 1e-12, 1, generator=generator).squeeze(1)
    centers = [x[rows, first]]  # (G, d)
    closest = (x - centers[0].unsqueeze(1)).square().sum(-1).double()
    for _ in range(1, k):
        p = weight.double() * closest
        empty = p.sum(1, keepdim=True) <= 0
        p = torch.where(empty, weight.double() + 1e-300, p)  # fewer distinct values than k: duplicate a value
        pick = torch.multinomial((p / p.sum(1, keepdim=True)).float() + 1e-30, 1, generator=generator).squeeze(1)
        centers.append(x[rows, pick])
        closest = torch.minimum(closest, (x - centers[-1].unsqueeze(1)).square().sum(-1).double())
    c = torch.stack(centers, 1)  # (G, k, d)
    wd = weight.to(x.dtype)
    previous = None
    for _ in range(lloyd_iters):
        assign = hard_assign(x, c)
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        one_hot = torch.zeros(G, R, k, dtype=x.dtype, device=x.device)
        one_hot.scatter_(2, assign.unsqueeze(-1), 1.0)
        one_hot *= wd.unsqueeze(-1)
        mass = one_hot.sum(1)
        sums = one_hot.transpose(1, 2) @ x
        c = torch.where((mass > 0).unsqueeze(-1), sums / mass.clamp_min(_TINY).unsqueeze(-1), c)
    return c


def kmeans_init(
    w: torch.Tensor, k: int, seed: int = 0, lloyd_iters: int = 50, max_rows: int = 1 << 16
) -> torch.Tensor:
    """Initial centroids for w (G, n, d): weighted k-means++ then Lloyd. Deterministic for a given seed.

    Runs on the CPU in float32 whatever w's device and dtype; returns (G, k, d) float32 on the CPU. For d = 1 it runs
    on the histogram of distinct float16 values (at most 65,536 per group, weighted by count), so outliers are seen
    and the cost does not grow with n. For d > 1 it runs on at most `max_rows` vectors per group (a seeded sample).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    w = w.detach().float().cpu()
    G, n, d = w.shape
    if d == 1:
        values, counts, _ = unique_buckets(w.squeeze(-1), bucket_dtype_for(w))
        x, weight = values.unsqueeze(-1), counts.float()
    else:
        if n > max_rows:
            rows = torch.randperm(n, generator=generator)[:max_rows].sort().values
            w = w[:, rows]
        x, weight = w, torch.ones(G, w.shape[1])
    per_batch = max(1, CHUNK_ELEMENTS // max(1, x.shape[1] * k * d))
    out = [
        _weighted_kmeans(x[g : g + per_batch], weight[g : g + per_batch], k, generator, lloyd_iters)
        for g in range(0, G, per_batch)
    ]
    return torch.cat(out, 0)
