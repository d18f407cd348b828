"""Initial centroids: weighted k-means++ seeding then Lloyd iterations, batched over LUT groups, on w's device.

A quantile-initialised Lloyd leaves outliers without a centroid; k-means++ (D^2 sampling) does not. For d = 1 (the
common case) the values of each group are sorted once, and every Lloyd iteration is then O(groups * k * log n): the
clusters of sorted values are intervals between centroid midpoints (`searchsorted`), and their sums come from
prefix sums. Per-tensor LUTs first reduce the weight to its histogram of distinct 16-bit values; per-row LUTs of an
LLM (hundreds of thousands of small groups) go straight to the sorted values.

Lloyd only finds a local optimum. With `restarts` > 1 every group runs that many seeded k-means (batched as extra
groups) and keeps the one of lowest inertia, as scikit-learn's `n_init` does; DKMConfig.kmeans_restarts says when
that helped and when it did not.
"""

from __future__ import annotations

import torch

from .attention import CHUNK_ELEMENTS, hard_assign
from .buckets import bucket_dtype_for, unique_buckets

_TINY = 1e-30
HISTOGRAM_FROM = 1 << 15  # groups with more values than this are reduced to their distinct 16-bit values first
RESTARTS = 1  # k-means runs per group by default; with more, the lowest-inertia one is kept


def _pick(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of p (G, R) >= 0, drawn with probability p / sum(p) by inverse CDF. The uniform numbers come
    from a CPU generator, so the draw is the same on every device; rows summing to 0 draw uniformly."""
    cdf = torch.cumsum(p, 1)
    total = cdf[:, -1:]
    flat = total <= 0
    if bool(flat.any()):
        cdf = torch.where(flat, torch.arange(1, p.shape[1] + 1, device=p.device, dtype=p.dtype), cdf)
        total = cdf[:, -1:]
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64).to(p.device, p.dtype) * total
    return torch.searchsorted(cdf, u, right=True).clamp_(max=p.shape[1] - 1).squeeze(1)


def _kmeans_1d(x: torch.Tensor, weight: torch.Tensor, k: int, generator: torch.Generator, lloyd_iters: int):
    """x (G, R) sorted ascending, weight (G, R) >= 0 -> (centroids (G, k) sorted, inertia (G,)). Exact Lloyd on
    sorted values."""
    G, R = x.shape
    rows = torch.arange(G, device=x.device)
    xd, wd = x.double(), weight.double()
    centers = [x[rows, _pick(wd, generator)]]
    closest = (xd - centers[0].double().unsqueeze(1)).square_()
    for _ in range(1, k):
        centers.append(x[rows, _pick(wd * closest, generator)])
        closest = torch.minimum(closest, (xd - centers[-1].double().unsqueeze(1)).square_())
    c = torch.stack(centers, 1).double().sort(1).values
    zero = torch.zeros(G, 1, dtype=torch.float64, device=x.device)
    cum_w = torch.cat([zero, torch.cumsum(wd, 1)], 1)
    cum_wx = torch.cat([zero, torch.cumsum(wd * xd, 1)], 1)
    previous = None
    for _ in range(lloyd_iters):
        # value v joins the nearest centroid; at an exact midpoint the lower one (as argmin does)
        edges = torch.searchsorted(xd, (c[:, 1:] + c[:, :-1]) / 2, right=True)
        if previous is not None and torch.equal(edges, previous):
            break
        previous = edges
        bounds = torch.cat([torch.zeros_like(edges[:, :1]), edges, torch.full_like(edges[:, :1], R)], 1)
        mass = cum_w.gather(1, bounds[:, 1:]) - cum_w.gather(1, bounds[:, :-1])
        sums = cum_wx.gather(1, bounds[:, 1:]) - cum_wx.gather(1, bounds[:, :-1])
        c = torch.where(mass > 0, sums / mass.clamp_min(_TINY), c).sort(1).values
    nearest = c.gather(1, torch.searchsorted((c[:, 1:] + c[:, :-1]) / 2, xd))
    return c.float(), (wd * (xd - nearest).square_()).sum(1)


def _weighted_kmeans(x, weight, k, generator, lloyd_iters):
    """k-means++ seeding then Lloyd, batched over groups, any d. x (G, R, d), weight (G, R) >= 0 -> (centroids
    (G, k, d), inertia (G,))."""
    G, R, d = x.shape
    rows = torch.arange(G, device=x.device)
    wd = weight.double()
    centers = [x[rows, _pick(wd, generator)]]  # (G, d)
    closest = (x - centers[0].unsqueeze(1)).square().sum(-1).double()
    for _ in range(1, k):
        centers.append(x[rows, _pick(wd * closest, generator)])
        closest = torch.minimum(closest, (x - centers[-1].unsqueeze(1)).square().sum(-1).double())
    c = torch.stack(centers, 1)  # (G, k, d)
    wx = weight.to(x.dtype)
    previous = None
    for _ in range(lloyd_iters):
        assign = hard_assign(x, c)
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        one_hot = torch.zeros(G, R, k, dtype=x.dtype, device=x.device)
        one_hot.scatter_(2, assign.unsqueeze(-1), 1.0)
        one_hot *= wx.unsqueeze(-1)
        mass = one_hot.sum(1)
        sums = one_hot.transpose(1, 2) @ x
        c = torch.where((mass > 0).unsqueeze(-1), sums / mass.clamp_min(_TINY).unsqueeze(-1), c)
    assign = hard_assign(x, c)
    nearest = c.gather(1, assign.unsqueeze(-1).expand(-1, -1, d))
    return c, (wd * (x - nearest).square().sum(-1).double()).sum(1)


def _best_of(run, x, weight, restarts: int, per_batch: int):
    """Run `run(x, weight) -> (centroids, inertia)` on `restarts` copies of every group (each copy seeded apart by the
    shared generator), in batches of `per_batch` groups, and keep each group's lowest-inertia centroids."""
    out = []
    for g in range(0, x.shape[0], per_batch):
        xb, wb = x[g : g + per_batch], weight[g : g + per_batch]
        n = xb.shape[0]
        c, inertia = run(xb.repeat(restarts, *[1] * (xb.dim() - 1)), wb.repeat(restarts, 1))
        best = inertia.view(restarts, n).argmin(0)
        out.append(c.view(restarts, n, *c.shape[1:])[best, torch.arange(n, device=c.device)])
    return torch.cat(out, 0)


def kmeans_init(
    w: torch.Tensor,
    k: int,
    seed: int = 0,
    lloyd_iters: int = 50,
    max_rows: int = 1 << 16,
    restarts: int = RESTARTS,
) -> torch.Tensor:
    """Initial centroids for w (G, n, d): weighted k-means++ then Lloyd, the best of `restarts` runs by inertia;
    (G, k, d) float32 on w's device.

    Deterministic for a given seed, on every device. For d = 1 the centroids come sorted. For d > 1 it runs on at
    most `max_rows` vectors per group (a seeded sample).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    w = w.detach().float()
    G, n, d = w.shape
    if d == 1:
        if n > HISTOGRAM_FROM:
            values, counts, _ = unique_buckets(w.squeeze(-1), bucket_dtype_for(w))
            weight = counts.float()
        else:
            values, weight = w.squeeze(-1), torch.ones(G, n, device=w.device)
        order = values.argsort(1)
        x, weight = values.gather(1, order), weight.gather(1, order)
        per_batch = max(1, CHUNK_ELEMENTS * 16 // max(1, x.shape[1] * restarts))
        run = lambda xb, wb: _kmeans_1d(xb, wb, k, generator, lloyd_iters)  # noqa: E731
        return _best_of(run, x, weight, restarts, per_batch).unsqueeze(-1)
    if n > max_rows:
        rows = torch.randperm(n, generator=generator)[:max_rows].sort().values.to(w.device)
        w = w[:, rows]
    x, weight = w, torch.ones(G, w.shape[1], device=w.device)
    per_batch = max(1, CHUNK_ELEMENTS * 16 // max(1, x.shape[1] * k * d * restarts))
    run = lambda xb, wb: _weighted_kmeans(xb, wb, k, generator, lloyd_iters)  # noqa: E731
    return _best_of(run, x, weight, restarts, per_batch)
