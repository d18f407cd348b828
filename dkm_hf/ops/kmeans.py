"""Initial centroids: weighted k-means++ seeding then Lloyd iterations, batched over LUT groups, on w's device.

A quantile-initialised Lloyd leaves outliers without a centroid; k-means++ (D^2 sampling) does not. For d = 1 (the
common case) the values of each group are sorted once and everything after works on their prefix sums of w, w x and
w x^2: with sorted values the cluster of each centroid is an interval between centroid midpoints (`searchsorted`), and
an interval's mass, sum and squared distance to any point come from three differences. A k-means++ draw picks an
interval by its D^2 mass, then the value inside it by binary search on the prefix sums; a Lloyd iteration moves each
centroid to its interval's mean and one batched `searchsorted` finds the new edges. Each step costs O(k log n) per
group instead of the O(n k) of working on every value. Per-tensor LUTs first reduce the weight to its histogram of
distinct 16-bit values; per-row LUTs of an LLM (hundreds of thousands of small groups) go straight to the sorted
values.

Lloyd only finds a local optimum. With `restarts` > 1 every group runs that many seeded k-means (side by side, as
extra centroid sets searched in the same sorted values) and keeps the one of lowest inertia, as scikit-learn's
`n_init` does; DKMConfig.kmeans_restarts says when that helped and when it did not.

With an `importance` per weight (>= 0, the weight's shape; e.g. `surgery.importance.gradient_importance`, the
diagonal Fisher information SqueezeLLM weighs its k-means with) every value counts by its importance: the centroids
minimise sum f (w - c)^2, so the values the loss is sensitive to get centroids of their own.

`kmeans_init_many` initialises many weights at once: the groups of all weights of one length are sorted and
clustered in one batched call. Each weight's random numbers come from its own generator seeded with `seed`, so a
weight gets the same centroids alone (`kmeans_init`) or batched with others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import fused
from .attention import CHUNK_ELEMENTS, all_finite, hard_assign
from .buckets import bucket_dtype_for, bucket_index

_TINY = 1e-30
HISTOGRAM_FROM = 1 << 15  # groups with more values than this are reduced to their distinct 16-bit values first
RESTARTS = 1  # k-means runs per group by default; with more, the lowest-inertia one is kept
LLOYD_ITERS = 50
# Sorted values per batched 1-D call (about 40 bytes each with their prefix sums and temporaries).
SORTED_BATCH_CPU = 1 << 22
SORTED_BATCH_ACCELERATOR = 1 << 25
NO_FLOAT64 = ("mps",)  # devices without float64 (Apple GPUs): k-means runs on CPU copies of their weights


class _Prefix:
    """Prefix sums of a batch of groups of sorted values: x (G, R) ascending, weight (G, R) >= 0 or None (all 1)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor | None):
        self.x = x.double()
        zero = self.x.new_zeros(x.shape[0], 1)
        wx = self.x if weight is None else self.x * weight.double()
        self.s0 = None if weight is None else torch.cat([zero, weight.double().cumsum(1)], 1)
        self.s1 = torch.cat([zero, wx.cumsum(1)], 1)
        self.s2 = torch.cat([zero, (wx * self.x).cumsum(1)], 1)

    def take(self, rows: torch.Tensor) -> _Prefix:
        new = object.__new__(_Prefix)
        new.x, new.s1, new.s2 = self.x[rows], self.s1[rows], self.s2[rows]
        new.s0 = None if self.s0 is None else self.s0[rows]
        return new

    def at(self, index: torch.Tensor, squares: bool = True) -> tuple[torch.Tensor, ...]:
        """(mass, sum[, sum of squares]) of the values before each position of index (G, ...) in [0, R]."""
        flat = index.reshape(index.shape[0], -1)
        sums = (flat.double() if self.s0 is None else self.s0.gather(1, flat), self.s1.gather(1, flat))
        if squares:
            sums += (self.s2.gather(1, flat),)
        return tuple(s.view(index.shape) for s in sums)

    def bounds(self, c: torch.Tensor) -> torch.Tensor:
        """The clusters of sorted centroids c (G, r, m) as bounds (G, r, m + 1) into the values: a value at a
        midpoint joins the lower centroid, as argmin does."""
        G, r, m = c.shape
        edges = torch.searchsorted(self.x, _midpoints(c).reshape(G, -1), right=True).view(G, r, m - 1)
        ends = edges.new_full((G, r, 1), self.x.shape[1])
        return torch.cat([torch.zeros_like(ends), edges, ends], -1)

    def stats(self, bounds: torch.Tensor, squares: bool = True) -> tuple[torch.Tensor, ...]:
        """Mass, sum [and sum of squares] (G, r, m) of the clusters between bounds (G, r, m + 1)."""
        return tuple(s.diff(dim=-1) for s in self.at(bounds, squares))

    def pick_by_mass(self, u: torch.Tensor) -> torch.Tensor:
        """Value positions (G, r) drawn by weight with uniform numbers u (G, r)."""
        R = self.x.shape[1]
        if self.s0 is None:
            return (u * R).long().clamp_(max=R - 1)
        index = torch.searchsorted(self.s0, u * self.s0[:, -1:], right=True) - 1
        return index.clamp_(0, R - 1)

    def search(self, lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The first position p in [lo, hi] where the D^2 mass of the values lo..p around centroid c exceeds target
        (all (G, r)): a binary search on the prefix sums."""
        b0, b1, b2 = self.at(lo)
        for _ in range(int((hi - lo).max()).bit_length() + 1):
            mid = (lo + hi) // 2
            s0, s1, s2 = self.at(mid + 1)
            below = (s2 - b2) - 2 * c * (s1 - b1) + c * c * (s0 - b0) <= target
            lo, hi = torch.where(below, mid + 1, lo), torch.where(below, hi, mid)
        return lo.clamp_(max=self.x.shape[1] - 1)


def _midpoints(c: torch.Tensor) -> torch.Tensor:
    return (c[..., 1:] + c[..., :-1]) / 2


def _sq_distance(c: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Sum of w (x - c)^2 over each cluster, from its mass, sum and sum of squares."""
    return (s2 - 2 * c * s1 + c * c * s0).clamp_min_(0)


def _seed_1d(p: _Prefix, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ on sorted values: k = u.shape[-1] centroids (G, r, k) sorted, drawn with uniform numbers u
    (G, r, k), and their cluster bounds. Draw j picks a cluster of the j centroids so far by its D^2 mass, then the
    value inside it; the new centroid splits that cluster's neighbourhood, so only its two edges are searched."""
    G, r, k = u.shape
    R = p.x.shape[1]
    c = p.x.gather(1, p.pick_by_mass(u[..., 0])).unsqueeze(-1)
    bounds = torch.zeros(G, r, 2, dtype=torch.long, device=c.device)
    bounds[..., 1] = R
    for j in range(1, k):
        mass = _sq_distance(c, *p.stats(bounds))
        cum = mass.cumsum(-1)
        target = u[..., j : j + 1] * cum[..., -1:]
        cell = torch.searchsorted(cum, target, right=True).clamp_(max=j - 1)
        rest = (target - cum.gather(-1, cell) + mass.gather(-1, cell)).squeeze(-1)
        lo = bounds.gather(-1, cell).squeeze(-1).clamp_(max=R - 1)
        hi = torch.maximum(bounds.gather(-1, cell + 1).squeeze(-1) - 1, lo)
        index = p.search(lo, hi, c.gather(-1, cell).squeeze(-1), rest)
        flat = cum[..., -1] <= 0  # every value sits on a centroid: draw by weight, as the first draw
        new = p.x.gather(1, torch.where(flat, p.pick_by_mass(u[..., j]), index)).unsqueeze(-1)  # (G, r, 1)
        at = (c < new).sum(-1, keepdim=True)  # where the new centroid goes in the sorted ones
        left = c.gather(-1, (at - 1).clamp_(min=0))
        right = c.gather(-1, at.clamp(max=j - 1))
        mids = torch.cat([(left + new) / 2, (new + right) / 2], -1).view(G, 2 * r)
        edges = torch.searchsorted(p.x, mids, right=True).view(G, r, 2)
        t = torch.arange(j + 2, device=c.device)
        shifted = bounds.gather(-1, torch.where(t <= at, t, t - 1).clamp_(max=j))
        left_edge = torch.where(at > 0, edges[..., :1], 0)
        right_edge = torch.where(at < j, edges[..., 1:], R)
        bounds = torch.where(t == at, left_edge, torch.where(t == at + 1, right_edge, shifted))
        c = torch.cat([c, new], -1).sort(-1).values
    return c, bounds


def _lloyd_1d(p: _Prefix, c: torch.Tensor, bounds: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd from sorted centroids c (G, r, k) and their cluster bounds until no cluster changes (or `iters`
    updates); the groups still moving are gathered into a smaller batch whenever they are fewer than half of it. On
    CPU, unweighted finite values take the same steps in one C++ loop per run (dkm_kmeans.cpp, equal to the bit)."""
    kernels = fused.cpu_kernels() if c.device.type == "cpu" and p.s0 is None and iters > 0 else None
    if kernels is not None and bool(torch.isfinite(p.x).all()):
        return kernels.lloyd_sorted(p.x.contiguous(), p.s1.contiguous(), c.contiguous(), bounds.contiguous(), iters)
    out = c.clone()
    rows = torch.arange(c.shape[0], device=c.device)
    for i in range(iters):
        if i > 0:
            # all edges searched again: one batched searchsorted is faster than re-checking the edges one by one
            previous, bounds = bounds, p.bounds(c)
            moving = (bounds != previous).flatten(1).any(1)
            n_moving = int(moving.sum())
            if n_moving == 0:
                break
            if 2 * n_moving < moving.numel():
                out[rows] = c
                keep = moving.nonzero().squeeze(1)
                p, rows, c, bounds = p.take(keep), rows[keep], c[keep], bounds[keep]
        s0, s1 = p.stats(bounds, squares=False)
        c = torch.where(s0 > 0, s1 / s0.clamp_min(_TINY), c).sort(-1).values
    out[rows] = c
    return out


def _kmeans_1d(x: torch.Tensor, weight: torch.Tensor | None, u: torch.Tensor, lloyd_iters: int) -> torch.Tensor:
    """x (G, R) sorted ascending, weight (G, R) >= 0 or None, uniform numbers u (G, restarts, k) -> the centroids
    (G, k) sorted, float32, of the lowest-inertia restart."""
    p = _Prefix(x, weight)
    c = _lloyd_1d(p, *_seed_1d(p, u), lloyd_iters)
    best = _sq_distance(c, *p.stats(p.bounds(c))).sum(-1).argmin(1)
    return c[torch.arange(c.shape[0], device=c.device), best].float()


def _uniform(seed: int, groups: int, restarts: int, k: int, device: torch.device) -> torch.Tensor:
    """The uniform numbers of one weight's k-means++ draws, (groups, restarts, k) float64: from a CPU generator
    seeded with `seed`, so the draws are the same on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(groups, restarts, k, generator=generator, dtype=torch.float64).to(device)


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


def _init_whole(
    w: torch.Tensor, k: int, seed: int, lloyd_iters: int, max_rows: int, restarts: int, f: torch.Tensor | None = None
) -> torch.Tensor:
    """The groups that are not batched across weights: d = 1 with more than HISTOGRAM_FROM values (clustered as
    their histogram of distinct 16-bit values) and d > 1 (at most `max_rows` vectors per group, a seeded sample);
    with `f` (G, n) the sample weights of the values (vectors) from their importance."""
    G, n, d = w.shape
    if d == 1:
        # on CPU the kernels key the 16-bit values in place (no per-weight inverse index, no sort)
        buckets = bucket_index(w.squeeze(-1), bucket_dtype_for(w))
        values, counts = buckets.values, buckets.counts
        if f is not None:  # a bucket weighs the importance of its values instead of their count
            counts = buckets.sums(f.reshape(-1).double()).view_as(values)
        x, order = values.float().sort(1)
        u = _uniform(seed, G, restarts, k, w.device)
        return _kmeans_1d(x, counts.gather(1, order).float(), u, lloyd_iters).unsqueeze(-1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if n > max_rows:
        rows = torch.randperm(n, generator=generator)[:max_rows].sort().values.to(w.device)
        w, f = w[:, rows], None if f is None else f[:, rows]
    x, weight = w, torch.ones(G, w.shape[1], device=w.device) if f is None else f
    per_batch = max(1, CHUNK_ELEMENTS * 16 // max(1, x.shape[1] * k * d * restarts))
    run = lambda xb, wb: _weighted_kmeans(xb, wb, k, generator, lloyd_iters)  # noqa: E731
    return _best_of(run, x, weight, restarts, per_batch)


def sample_weights(f: torch.Tensor) -> torch.Tensor:
    """Importance (G, n) as sample weights (of k-means and of the DKM loop): negative values count as 0, a floor of
    1e-3 of each group's mean keeps every value in play, and a group without any importance is clustered unweighted."""
    f = f.detach().float().clamp_min(0)
    mean = f.mean(1, keepdim=True)
    return torch.where(mean > 0, f + 1e-3 * mean, torch.ones_like(f))


def _init_weighted(w, f, k: int, seed: int, lloyd_iters: int, max_rows: int, restarts: int) -> torch.Tensor:
    """Centroids of one weight w (G, n, d) weighted by its importance f (G, n, d): per vector, the sum over d."""
    G, n, d = w.shape
    f = sample_weights(f.float().sum(-1))
    if d > 1 or n > HISTOGRAM_FROM:
        return _init_whole(w, k, seed, lloyd_iters, max_rows, restarts, f)
    u = _uniform(seed, G, restarts, k, w.device)
    step = max(1, (SORTED_BATCH_CPU if w.device.type == "cpu" else SORTED_BATCH_ACCELERATOR) // n)
    out = []
    for g in range(0, G, step):
        x, order = w[g : g + step, :, 0].sort(1)
        out.append(_kmeans_1d(x, f[g : g + step].gather(1, order), u[g : g + step], lloyd_iters))
    return torch.cat(out, 0).unsqueeze(-1)


def kmeans_init_many(
    weights: Sequence[torch.Tensor],
    k: int,
    seed: int = 0,
    restarts: int = RESTARTS,
    lloyd_iters: int = LLOYD_ITERS,
    max_rows: int = 1 << 16,
    importance: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Initial centroids of many weights, each (G_i, n_i, d_i): weighted k-means++ then Lloyd, the best of `restarts`
    runs by inertia; a list of (G_i, k, d_i) float32 tensors, each on its weight's device.

    The groups of all weights with d = 1 and the same n (the per-row LUTs of every layer of one shape) are sorted and
    clustered together, in batches of about SORTED_BATCH_CPU (on CPU) values. Deterministic for a given seed,
    whatever the batching: each weight gets what `kmeans_init(w, k, seed)` gives it. For d = 1 the centroids come
    sorted. `importance` (one tensor of the weight's shape, or None, per weight): each value counts by its
    importance (>= 0; a vector of d > 1 by the sum of its values'), see the module docstring; weighted weights are
    clustered one at a time.
    """
    if any(w.device.type in NO_FLOAT64 for w in weights):  # k-means sums in float64: on CPU copies
        on_cpu = [None if f is None else f.cpu() for f in importance] if importance is not None else None
        cpu = kmeans_init_many([w.cpu() for w in weights], k, seed, restarts, lloyd_iters, max_rows, on_cpu)
        return [c.to(w.device) for c, w in zip(cpu, weights)]
    out: list[torch.Tensor | None] = [None] * len(weights)
    importance = [None] * len(weights) if importance is None else list(importance)
    if len(importance) != len(weights):
        raise ValueError(f"kmeans_init_many: {len(importance)} importance tensors for {len(weights)} weights")
    batched: dict[tuple[int, torch.device], list[int]] = {}
    for i, w in enumerate(weights):
        if w.dim() != 3 or 0 in w.shape:
            raise ValueError(f"kmeans_init_many: weight {i} has shape {tuple(w.shape)}; expected (groups, n, d) > 0")
        if not bool(all_finite(w)):  # one inf would make every centroid of its group inf
            raise ValueError(f"kmeans_init_many: weight {i} has non-finite values (NaN or inf)")
        f = importance[i]
        if f is not None:
            if tuple(f.shape) != tuple(w.shape):
                raise ValueError(
                    f"kmeans_init_many: importance {i} has shape {tuple(f.shape)}, its weight {tuple(w.shape)}"
                )
            if not bool(all_finite(f)):
                raise ValueError(f"kmeans_init_many: importance {i} has non-finite values")
            out[i] = _init_weighted(w.detach().float(), f.to(w.device), k, seed, lloyd_iters, max_rows, restarts)
        elif w.shape[2] == 1 and w.shape[1] <= HISTOGRAM_FROM:
            batched.setdefault((w.shape[1], w.device), []).append(i)
        else:
            out[i] = _init_whole(w.detach().float(), k, seed, lloyd_iters, max_rows, restarts)
    for (n, device), members in batched.items():
        limit = max(1, (SORTED_BATCH_CPU if device.type == "cpu" else SORTED_BATCH_ACCELERATOR) // n)
        pieces: list[tuple[int, int, int]] = []  # (weight, first row, end row) of the next batch
        results: dict[int, list[torch.Tensor]] = {i: [] for i in members}
        uniform = {}
        for i in members:
            rows = weights[i].shape[0]
            uniform[i] = _uniform(seed, rows, restarts, k, device)
            start = 0
            while start < rows:
                room = limit - sum(e - s for _, s, e in pieces)
                end = min(rows, start + room)
                pieces.append((i, start, end))
                start = end
                if sum(e - s for _, s, e in pieces) >= limit:
                    _run_batch(weights, pieces, uniform, results, lloyd_iters)
                    pieces = []
        if pieces:
            _run_batch(weights, pieces, uniform, results, lloyd_iters)
        for i in members:
            out[i] = torch.cat(results[i], 0).unsqueeze(-1)
            del uniform[i]
    return out


def _run_batch(weights, pieces, uniform, results, lloyd_iters: int) -> None:
    """Cluster the rows `pieces` names ((weight, first row, end row), d = 1, one length) as one batch."""
    x = torch.cat([weights[i][s:e, :, 0].detach().float() for i, s, e in pieces], 0).sort(1).values
    u = torch.cat([uniform[i][s:e] for i, s, e in pieces], 0)
    centroids = _kmeans_1d(x, None, u, lloyd_iters)
    for (i, s, e), c in zip(pieces, centroids.split([e - s for _, s, e in pieces], 0)):
        results[i].append(c)


def kmeans_init(
    w: torch.Tensor,
    k: int,
    seed: int = 0,
    lloyd_iters: int = LLOYD_ITERS,
    max_rows: int = 1 << 16,
    restarts: int = RESTARTS,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Initial centroids for w (G, n, d): weighted k-means++ then Lloyd, the best of `restarts` runs by inertia;
    (G, k, d) float32 on w's device.

    Deterministic for a given seed, on every device. For d = 1 the centroids come sorted. For d > 1 it runs on at
    most `max_rows` vectors per group (a seeded sample). `importance` (w's shape, >= 0): each value counts by it.
    `kmeans_init_many` does many weights at once.
    """
    return kmeans_init_many([w], k, seed, restarts, lloyd_iters, max_rows, [importance])[0]
