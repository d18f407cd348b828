"""Distances, the DKM attention softmax and nearest-centroid assignment, batched over LUT groups; `all_finite`.

Shapes: vectors `w` are (G, m, d) (G LUT groups, m vectors of d = cluster_dim values), centroids `c` are (G, k, d).
Attention is returned centroid-major, (G, k, m): the softmax over the k centroids then runs along a leading
dimension (vectorised over the m vectors, unlike torch's softmax over a short last dimension), and the reductions
over vectors run along the contiguous last one.

Large tensors are processed in blocks of groups and vectors (`blocks`) whose (g, k, m) temporaries hold at most
`chunk_elements(device)` values. On CPU that is about a megabyte, so that the ten or so passes over a block stay in
the CPU's cache (2.2x faster than blocks of 4M values for a 1536 x 576 layer with 16 centroids at one thread). On a
GPU each block costs a dozen kernel launches, so blocks are 64x larger: with CPU-sized blocks a per-row 4-bit
SmolLM2-135M step took 9.3 s on an H200 (80x a plain step), launching ~55 blocks per layer and pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import fused

CHUNK_ELEMENTS = 1 << 18  # CPU
CHUNK_ELEMENTS_ACCELERATOR = 1 << 24  # CUDA and other devices: 64 MB per float32 temporary
# Logits more than this far below the largest one are clamped before exp: their weight (< 2e-35) is far below float
# precision, and exp is ~30x slower on arguments whose results are denormal.
EXP_FLOOR = -80.0


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of `t` is finite, as a 0-dim bool tensor on its device (no host synchronisation): its
    smallest and largest values, which NaN propagates to. `torch.isfinite(t).all()` builds several temporaries of
    t's size (+670 MB for a 100M-value float32 weight)."""
    if not t.is_floating_point() or not t.numel():
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack([t.amin(), t.amax()])).all()


def chunk_elements(device: torch.device | str | None) -> int:
    """The most values of one (g, k, m) block on `device` (CPU when None)."""
    return CHUNK_ELEMENTS if device is None or torch.device(device).type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR


def blocks(groups: int, m: int, k: int, device: torch.device | str | None = None):
    """(group slice, vector slice) pairs covering a (groups, m) grid; each block's (g, k, m) array has at most
    `chunk_elements(device)` values (at least one vector of one group)."""
    limit = chunk_elements(device)
    per_group = m * k
    if per_group <= limit:
        step = max(1, limit // per_group)
        for g in range(0, groups, step):
            yield slice(g, min(groups, g + step)), slice(0, m)
    else:
        step = max(1, limit // k)
        for g in range(groups):
            for i in range(0, m, step):
                yield slice(g, g + 1), slice(i, min(m, i + step))


def squared_distance(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||w_i - c_j||^2 for w (G, m, d) and c (G, k, d) -> (G, k, m).

    Exact differences for d = 1; for d > 1 the expansion ||w||^2 - 2 c.w + ||c||^2 as one batched matmul (its
    cancellation error, ~1e-7 of ||w||^2, is far below any useful tau), clamped at 0.
    """
    if w.shape[-1] == 1:
        return (w.transpose(1, 2) - c).square_()
    dist = torch.baddbmm(c.square().sum(-1, keepdim=True), c, w.transpose(1, 2), alpha=-2.0)
    return dist.add_(w.square().sum(-1).unsqueeze(1)).clamp_min_(0.0)


def attention(w: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """A_ji = softmax_j(-||w_i - c_j||^2 / tau) for w (G, m, d) and c (G, k, d) -> (G, k, m), columns sum to 1."""
    dist = squared_distance(w, c)
    logits = torch.sub(dist.amin(1, keepdim=True), dist).mul_(1.0 / tau).clamp_min_(EXP_FLOOR)
    weights = logits.exp_()
    return weights.div_(weights.sum(1, keepdim=True))


# The three products the DKM loop needs, for a (g, k, m), c (g, k, d), v (g, m, d). For d = 1 they are an elementwise
# product and a sum (4x faster than torch.bmm's tiny matrix-vector products on CPU).
def reduce_vectors(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i a_ji v_i -> (g, k, d)."""
    return (a * v.transpose(1, 2)).sum(2, keepdim=True) if v.shape[-1] == 1 else a @ v


def mix_centroids(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_j a_ji c_j -> (g, m, d)."""
    return (a * c).sum(1).unsqueeze(-1) if c.shape[-1] == 1 else a.transpose(1, 2) @ c


def outer(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """c_j . v_i -> (g, k, m)."""
    return c * v.transpose(1, 2) if c.shape[-1] == 1 else c @ v.transpose(1, 2)


def hard_assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every vector: w (G, n, d), c (G, k, d) -> (G, n) int64; the first (lowest)
    index among centroids at the same distance, as argmin."""
    G, n, d = w.shape
    c = centroids.to(w.dtype)
    # 16-bit squares tie too often to match argmin; non-finite centroids do not sort
    if d == 1 and w.dtype in (torch.float32, torch.float64) and not c.is_meta and bool(torch.isfinite(c).all()):
        return _hard_assign_1d(w[..., 0], c[..., 0])
    idx = torch.empty(G, n, dtype=torch.int64, device=w.device)
    for gs, ms in blocks(G, n, c.shape[1], w.device):
        idx[gs, ms] = squared_distance(w[gs, ms], c[gs]).argmin(1)
    return idx


ASSIGN_SLICE = 1 << 20  # vectors per call of `hard_assign_slices`: 8 MB of int64 indices at a time


def assign_slices(w: torch.Tensor, centroids: torch.Tensor, size: int | None = None) -> Iterator[tuple]:
    """(groups, vectors, indices) of `hard_assign(w, centroids)` in pieces of about `size` vectors (ASSIGN_SLICE), in
    order: whole groups at a time, or parts of one group where a group is larger; `groups` and `vectors` are the
    slices of w that `indices` (int64, their shape) assigns. A weight's indices then never exist at once as int64 (8
    bytes a weight, and as many again in each step of packing them or gathering their centroids). A 16-bit w is
    assigned in float32 a slice at a time (its values exactly; no float32 copy of the whole weight)."""
    G, n, _ = w.shape
    size = size or ASSIGN_SLICE
    exact = lambda x: x.float() if x.element_size() < 4 else x  # noqa: E731
    if w.is_meta or not bool(torch.isfinite(centroids).all()):
        # hard_assign picks its method from the centroids it is given: slices of broken centroids (NaN, inf) could
        # then be assigned otherwise than the whole, which decides the ties of all-infinite distances
        yield slice(None), slice(None), hard_assign(exact(w), centroids)
        return
    if n <= size:
        step = max(1, size // max(n, 1))
        for g in range(0, G, step):
            yield slice(g, g + step), slice(None), hard_assign(exact(w[g : g + step]), centroids[g : g + step])
        return
    for g in range(G):
        for i in range(0, n, size):
            rows, part = slice(g, g + 1), slice(i, i + size)
            yield rows, part, hard_assign(exact(w[rows, part]), centroids[rows])


def hard_assign_slices(w: torch.Tensor, centroids: torch.Tensor, size: int | None = None) -> Iterator[torch.Tensor]:
    """`hard_assign(w, centroids).reshape(-1)` in pieces (`assign_slices`), in order, packed as they come."""
    for _, _, indices in assign_slices(w, centroids, size):
        yield indices.reshape(-1)


def snap(w: torch.Tensor, centroids: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """`gather_centroids(hard_assign(w, centroids), lut)`, (G, n, d) in lut's dtype, assigned a slice at a time."""
    out = torch.empty(w.shape, dtype=lut.dtype, device=w.device)
    for groups, vectors, indices in assign_slices(w, centroids):
        out[groups, vectors] = gather_centroids(indices, lut[groups])
    return out


_NEIGHBOURS = 3  # sorted positions compared exactly around the one found by midpoint search


def _hard_assign_1d(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`hard_assign` for d = 1 in O(log k) per value: a binary search among the midpoints of the sorted centroids, then
    the exact squared distances to that position and its two neighbours (a value within rounding of a midpoint), each
    position standing for the first of its run of equal centroids (stable sort: the lowest original index)."""
    G, k = c.shape
    sorted_c, order = c.sort(dim=1, stable=True)
    first = torch.searchsorted(sorted_c, sorted_c)  # first sorted position of each value's run of equals
    order = order.gather(1, first)
    if x.device.type == "cpu" and x.dtype == torch.float32 and k > 1:
        kernels = fused.cpu_kernels()  # the CPU extension: the same steps in one loop (dkm_buckets.cpp)
        if kernels is not None:
            return kernels.nearest_sorted(x.contiguous(), sorted_c.contiguous(), order.contiguous())
    mids = ((sorted_c[:, 1:] + sorted_c[:, :-1]) / 2).contiguous()
    idx = torch.empty(x.shape, dtype=torch.int64, device=x.device)
    for gs, ms in blocks(G, x.shape[1], 4 * _NEIGHBOURS, x.device):
        xb = x[gs, ms].contiguous()
        pos = torch.searchsorted(mids[gs], xb)
        best_d = best_i = None
        for offset in range(-(_NEIGHBOURS // 2), _NEIGHBOURS // 2 + 1):
            j = (pos + offset).clamp_(0, k - 1)
            dist = (xb - sorted_c[gs].gather(1, j)).square_()
            i = order[gs].gather(1, j)
            if best_d is None:
                best_d, best_i = dist, i
                continue
            better = (dist < best_d) | ((dist == best_d) & (i < best_i))
            best_d, best_i = torch.where(better, dist, best_d), torch.where(better, i, best_i)
        idx[gs, ms] = best_i
    return idx


def gather_centroids(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """indices (G, n), lut (G, k, d) -> (G, n, d)."""
    return torch.gather(lut, 1, indices.unsqueeze(-1).expand(-1, -1, lut.shape[-1]))
