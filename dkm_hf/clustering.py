"""The mathematics of DKM, in plain torch (no nn.Module, no transformers).

Shapes: a clustered weight is handled as `w` of shape (G, n, d): G LUT groups, n vectors per group, vectors of
d = cluster_dim values. Centroids `c` are (G, k, d) with k = 2**bits.

One DKM forward (Cho et al., 2022, Sec. 3), starting from the previous step's (detached) centroids C_0:

    for t = 1..T:                                   T <= max_iters, stop early once max|C_t - C_{t-1}| <= epsilon
        A_t = softmax_j( -||w_i - C_{t-1,j}||^2 / tau )      attention, rows sum to 1
        C_t = (A_t^T w) / (A_t^T 1)                          attention-weighted centroid update
    W~ = A_T C_T                                             soft-clustered weight used by the layer

Gradients flow from W~ through every iteration into w. Autograd would keep every A_t and distance matrix:
O(T * n * k) floats per layer. `dkm_cluster` instead saves w and the (T+1, k, d) centroid history and
recomputes attention chunk by chunk in backward: exact gradients with O(n) extra memory.

For d = 1 the eDKM "uniquification" (Cho et al., 2023) makes the heavy part independent of n: 16-bit floats
take at most 65,536 values, so attention is computed once per distinct value (bucket) and gathered. Each weight
still gets its own gradient: dL/dw_i = a(u_i) * g_i + b(u_i), where g_i is the upstream gradient of weight i,
a(u) the derivative of the soft weight at bucket u and b(u) the shared path through the centroids.
"""

from __future__ import annotations

import torch

# Rows per chunk are chosen so a chunk's (rows x k x d) temporaries stay under this many elements.
CHUNK_ELEMENTS = 1 << 22
_TINY = 1e-30


def _rows_per_chunk(k: int, d: int, groups: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, k * d * groups))


def _chunks(n: int, step: int):
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def squared_distance(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||w_i - c_j||^2 for w (G, m, d) and c (G, k, d) -> (G, m, k).

    Exact differences for d = 1; for d > 1 the expansion ||w||^2 - 2 w.c + ||c||^2 as one batched matmul (its
    cancellation error, ~1e-7 of ||w||^2, is far below any useful tau), clamped at 0.
    """
    if w.shape[-1] == 1:
        return (w - c.transpose(1, 2)).square()
    dist = torch.baddbmm(c.square().sum(-1).unsqueeze(1), w, c.transpose(1, 2), alpha=-2.0)
    return dist.add_(w.square().sum(-1, keepdim=True)).clamp_min_(0.0)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a (G, m, k) tensor.

    torch's CPU softmax vectorises along the softmax dimension, which is slow for the few centroids of 1-3 bit
    LUTs (66 ms for 1M rows of 4 at one thread); over the transposed, contiguous (G, k, m) copy it vectorises along
    the rows instead (12 ms). From 16 centroids on the direct call is as fast or faster.
    """
    if z.shape[-1] >= 16:
        return torch.softmax(z, dim=-1)
    return torch.softmax(z.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2).contiguous()


def attention(w: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax_j(-||w_i - c_j||^2 / tau) for w (G, m, d) and c (G, k, d) -> (G, m, k).

    For d > 1 the row constant -||w_i||^2 / tau is dropped (softmax does not see it), which leaves one fused
    batched matmul for the logits (2 w.c - ||c||^2) / tau: two passes over the (m, k) array instead of five.
    """
    if w.shape[-1] == 1:
        return _softmax(squared_distance(w, c) / -tau)
    bias = c.square().sum(-1).unsqueeze(1)  # (G, 1, k)
    return _softmax(torch.baddbmm(bias, w, c.transpose(1, 2), beta=-1.0 / tau, alpha=2.0 / tau))


def _t_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for a (G, m, k) and b (G, m, d) -> (G, k, d), computed as (b^T a)^T.

    CPU matmul kernels handle the long inner dimension much better in this orientation when d is small: 0.19 ms
    against 2.6 ms for m = 8192, k = 256, d = 2 at one thread; never slower in the sizes DKM uses.
    """
    return (b.transpose(1, 2) @ a).transpose(1, 2)


def _matmul_narrow(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a c for a (G, m, k) and a narrow c (G, k, d) -> (G, m, d), computed as (c^T a^T)^T (2.3x faster for d = 2,
    as fast or faster for d = 1). The result is a transposed view."""
    return (c.transpose(1, 2) @ a.transpose(1, 2)).transpose(1, 2)


def _softmax_backward(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return a * (grad - (a * grad).sum(-1, keepdim=True))


def _distance_backward(dz: torch.Tensor, w: torch.Tensor, c: torch.Tensor, tau: float):
    """Pull dL/dz back through z_ij = -||w_i - c_j||^2 / tau. Returns (dL/dw, dL/dc summed over rows)."""
    row_sum = dz.sum(-1, keepdim=True)  # (G, m, 1)
    dw = (_matmul_narrow(dz, c) - w * row_sum) * (2.0 / tau)
    dc = (_t_matmul(dz, w) - c * dz.sum(1).unsqueeze(-1)) * (2.0 / tau)
    return dw, dc


def _iterate(w, c0, tau, max_iters, epsilon, weight=None):
    """The DKM centroid loop without autograd. Returns the centroid history [C_0, ..., C_T] and the masses m_t."""
    G, n, d = w.shape
    k = c0.shape[1]
    step = _rows_per_chunk(k, d, G)
    history, masses = [c0], []
    c = c0
    for _ in range(max_iters):
        s = torch.zeros_like(c)
        m = torch.zeros(G, k, dtype=c.dtype, device=c.device)
        for sl in _chunks(n, step):
            a = attention(w[:, sl], c, tau)
            if weight is not None:
                a = a * weight[:, sl, None]
            s += _t_matmul(a, w[:, sl])
            m += a.sum(1)
        alive = m > _TINY
        c_new = torch.where(alive.unsqueeze(-1), s / m.clamp_min(_TINY).unsqueeze(-1), c)
        history.append(c_new)
        masses.append(m)
        moved = (c_new - c).abs().max().item() if c.numel() else 0.0
        c = c_new
        if moved <= epsilon:
            break
    return history, masses


def _soft_output(w, history, tau):
    G, n, d = w.shape
    step = _rows_per_chunk(history[-1].shape[1], d, G)
    out = torch.empty_like(w)
    for sl in _chunks(n, step):
        out[:, sl] = _matmul_narrow(attention(w[:, sl], history[-2], tau), history[-1])
    return out


def _backward(w, history, masses, tau, grad_rows, weight=None, direct_per_unit=False):
    """Reverse pass of `_iterate` + `_soft_output`, chunked.

    `grad_rows` (G, n, d) is dL/dW~ summed over the weights each row stands for (one weight per row in the chunked
    path; a whole bucket in the uniquified path, where `weight` holds the bucket counts).
    Returns (b, a): b (G, n, d) is the part of dL/dw shared by every weight of a row; a (G, n, d) is, with
    `direct_per_unit`, the derivative of the soft weight at the row (d = 1; multiply by each weight's own upstream
    gradient), otherwise None and the direct part is already inside b.
    """
    G, n, d = w.shape
    T = len(history) - 1
    c_last = history[-1]
    step = _rows_per_chunk(c_last.shape[1], d, G)

    # dL/dC_T from W~ = A_T C_T
    dc = torch.zeros_like(c_last)
    for sl in _chunks(n, step):
        dc += _t_matmul(attention(w[:, sl], history[-2], tau), grad_rows[:, sl])

    b = torch.zeros_like(w)
    a_direct = torch.zeros_like(w) if direct_per_unit else None
    for t in range(T, 0, -1):
        c_prev, c_t, m_t = history[t - 1], history[t], masses[t - 1]
        alive = (m_t > _TINY).unsqueeze(-1)
        inv_m = (1.0 / m_t.clamp_min(_TINY)).unsqueeze(-1)
        ds = torch.where(alive, dc * inv_m, 0.0)  # dL/dS_t, S_t = A_t^T w
        dm = torch.where(alive, -(dc * c_t).sum(-1, keepdim=True) * inv_m, 0.0).transpose(1, 2)  # (G, 1, k)
        dc_prev = torch.where(alive, 0.0, dc)  # dead clusters carry C_{t-1} over unchanged
        for sl in _chunks(n, step):
            wc = w[:, sl]
            a = attention(wc, c_prev, tau)
            dz_cent = _softmax_backward(a, wc @ ds.transpose(1, 2) + dm)
            dw_cent, _ = _distance_backward(dz_cent, wc, c_prev, tau)
            b[:, sl] += _matmul_narrow(a, ds) + dw_cent
            dz_total = dz_cent if weight is None else dz_cent * weight[:, sl, None]
            if t == T:
                dz_dir = _softmax_backward(a, grad_rows[:, sl] @ c_t.transpose(1, 2))
                dz_total = dz_total + dz_dir
                if direct_per_unit:
                    unit = _softmax_backward(a, c_t.transpose(1, 2).expand_as(a))
                    a_direct[:, sl] = _distance_backward(unit, wc, c_prev, tau)[0]
                else:
                    b[:, sl] += _distance_backward(dz_dir, wc, c_prev, tau)[0]
            if t > 1:
                dc_prev += _distance_backward(dz_total, wc, c_prev, tau)[1]
        dc = dc_prev
    return b, a_direct


class _ChunkedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, c0, tau, max_iters, epsilon):
        with torch.no_grad():
            history, masses = _iterate(w, c0, tau, max_iters, epsilon)
            out = _soft_output(w, history, tau)
        ctx.save_for_backward(w, *history, *masses)
        ctx.tau, ctx.T = tau, len(masses)
        c_final = history[-1].clone()
        ctx.mark_non_differentiable(c_final)
        return out, c_final

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        saved = ctx.saved_tensors
        w, history, masses = saved[0], list(saved[1 : ctx.T + 2]), list(saved[ctx.T + 2 :])
        with torch.no_grad():
            b, _ = _backward(w, history, masses, ctx.tau, grad_out)
        return b, None, None, None, None


def bucket_dtype_for(w: torch.Tensor) -> torch.dtype:
    """16-bit dtype whose bit pattern indexes a bucket: the weight's own if 16-bit, else float16 (`unique_buckets`
    falls back to bfloat16 for weights beyond float16's range)."""
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16


_FP16_INF = (0x7C00, 0xFC00)


def unique_buckets(w: torch.Tensor, bucket_dtype: torch.dtype):
    """Distinct 16-bit values per group of w (G, n).

    Returns values (G, U), counts (G, U) and `inverse` (G * n,): the index of each weight's bucket in the flattened
    (G * U) rows. Groups with fewer than U distinct values are padded with value 0 and count 0.
    """
    G, n = w.shape
    device = w.device
    keys = w.detach().to(bucket_dtype).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    if G == 1:
        counts = torch.bincount(keys.view(-1), minlength=65536)
        if bucket_dtype == torch.float16 and w.dtype != torch.float16 and counts[list(_FP16_INF)].any():
            return unique_buckets(w, torch.bfloat16)  # beyond float16's range
        present = counts.nonzero().squeeze(1)
        table = torch.empty(65536, dtype=torch.int32, device=device)
        table[present] = torch.arange(present.numel(), dtype=torch.int32, device=device)
        inverse = table.index_select(0, keys.view(-1))
        uniq_keys, uniq_counts = present.unsqueeze(0), counts[present].unsqueeze(0)
    else:
        if bucket_dtype == torch.float16 and w.dtype != torch.float16:
            if torch.isin(keys, torch.tensor(_FP16_INF, dtype=keys.dtype, device=device)).any():
                return unique_buckets(w, torch.bfloat16)
        flat = keys.to(torch.int64) + torch.arange(G, device=device).unsqueeze(1) * 65536
        uk, inv, cnt = torch.unique(flat.view(-1), return_inverse=True, return_counts=True)
        group = uk // 65536
        per_group = torch.bincount(group, minlength=G)
        first = torch.cumsum(per_group, 0) - per_group
        pos = torch.arange(uk.numel(), device=device) - first[group]
        umax = int(per_group.max())
        uniq_keys = torch.zeros(G, umax, dtype=torch.int64, device=device)
        uniq_counts = torch.zeros(G, umax, dtype=torch.int64, device=device)
        uniq_keys[group, pos] = uk % 65536
        uniq_counts[group, pos] = cnt
        inverse = (group * umax + pos).to(torch.int32)[inv]
    signed = torch.where(uniq_keys >= 32768, uniq_keys - 65536, uniq_keys).to(torch.int16)
    values = signed.view(bucket_dtype).to(w.dtype)
    values = torch.where(uniq_counts > 0, values, torch.zeros((), dtype=w.dtype, device=device))
    return values, uniq_counts, inverse


class _UniquifiedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, c0, tau, max_iters, epsilon, bucket_dtype):
        with torch.no_grad():
            values, counts, inverse = unique_buckets(w.squeeze(-1), bucket_dtype)
            u = values.unsqueeze(-1)
            weight = counts.to(w.dtype)
            history, masses = _iterate(u, c0, tau, max_iters, epsilon, weight=weight)
            out_u = _soft_output(u, history, tau)
            out = out_u.view(-1).index_select(0, inverse).view_as(w)
        ctx.save_for_backward(u, weight, inverse, *history, *masses)
        ctx.tau, ctx.T = tau, len(masses)
        c_final = history[-1].clone()
        ctx.mark_non_differentiable(c_final)
        return out, c_final

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        saved = ctx.saved_tensors
        u, weight, inverse = saved[:3]
        history, masses = list(saved[3 : ctx.T + 4]), list(saved[ctx.T + 4 :])
        with torch.no_grad():
            g = grad_out.reshape(-1)
            g_rows = torch.zeros(u.numel(), dtype=g.dtype, device=g.device).index_add_(0, inverse, g).view_as(u)
            b, a = _backward(u, history, masses, ctx.tau, g_rows, weight=weight, direct_per_unit=True)
            # one gather of (a, b) per weight: dL/dw_i = a(u_i) * g_i + b(u_i)
            ab = torch.stack([a.view(-1), b.view(-1)], 1).index_select(0, inverse)
            grad_w = torch.addcmul(ab[:, 1], ab[:, 0], g)
        return grad_w.view_as(grad_out), None, None, None, None, None


def dkm_cluster(
    w: torch.Tensor,
    centroids: torch.Tensor,
    tau: float,
    max_iters: int,
    epsilon: float,
    implementation: str = "chunked",
    bucket_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-cluster w (G, n, d) starting from `centroids` (G, k, d).

    Returns (W~, C_T): the differentiable soft weight and the final centroids (detached), to carry to the next step.
    `implementation` is "chunked" (exact, any d) or "uniquified" (d = 1; attention per distinct 16-bit value of
    `bucket_dtype`, by default the weight's own dtype if 16-bit, else float16).
    """
    c0 = centroids.detach().to(w.dtype)
    if implementation == "uniquified":
        if w.shape[-1] != 1:
            raise ValueError(f"the uniquified DKM path needs cluster_dim 1, got {w.shape[-1]}")
        return _UniquifiedDKM.apply(w, c0, tau, max_iters, epsilon, bucket_dtype or bucket_dtype_for(w))
    if implementation != "chunked":
        raise ValueError(f"unknown DKM implementation {implementation!r}; use 'chunked' or 'uniquified'")
    return _ChunkedDKM.apply(w, c0, tau, max_iters, epsilon)


def hard_assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every vector: w (G, n, d), c (G, k, d) -> (G, n) int64."""
    G, n, d = w.shape
    step = _rows_per_chunk(centroids.shape[1], d, G)
    idx = torch.empty(G, n, dtype=torch.int64, device=w.device)
    c = centroids.to(w.dtype)
    for sl in _chunks(n, step):
        idx[:, sl] = squared_distance(w[:, sl], c).argmin(-1)
    return idx


def gather_centroids(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """indices (G, n), lut (G, k, d) -> (G, n, d)."""
    G, k, d = lut.shape
    return torch.gather(lut, 1, indices.unsqueeze(-1).expand(-1, -1, d))


# -- initialisation ------------------------------------------------------------------------------------------------


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

    For d = 1 it runs on the histogram of distinct float16 values (at most 65,536 per group, weighted by count), so
    outliers are seen and the cost does not grow with n. For d > 1 it runs on at most `max_rows` vectors per group
    (a seeded sample).
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
