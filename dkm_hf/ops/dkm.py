"""The DKM loop (Cho et al., ICLR 2022, Sec. 3) as autograd functions that keep O(n) memory.

A clustered weight is handled as `w` of shape (G, n, d): G LUT groups, n vectors per group, vectors of
d = cluster_dim values. Centroids `c` are (G, k, d) with k = 2**bits. One forward, from the previous step's
(detached) centroids C_0:

    for t = 1..T:                                   T <= max_iters: the first t with max|C_t - C_{t-1}| <= epsilon
        A_t = softmax_j( -||w_i - C_{t-1,j}||^2 / tau )      attention, rows sum to 1
        C_t = (A_t^T w) / (A_t^T 1)                          attention-weighted centroid update
    W~ = A_T C_T                                             soft-clustered weight used by the layer

Gradients flow from W~ through every iteration into w. Autograd would keep every A_t and distance matrix:
O(T * n * k) floats per layer. These functions save w and the (T+1, k, d) centroid history instead and recompute
attention chunk by chunk in backward: exact gradients with O(n) extra memory.

On CPU the early stop is checked on the host after each iteration. On other devices the loop runs all max_iters
iterations without a host synchronisation and picks T on the device; the result is the same (T is defined by the
same test), the iterations after T are wasted work instead of a stall.

The "fused" implementation (`fused.py`) runs the same loop and the same backward as the chunked path in one kernel
per iteration (C++ on CPU, Triton on CUDA) that never writes the attention out; the torch paths here are its
reference.

For d = 1 the eDKM "uniquification" (Cho et al., 2023) makes the heavy part independent of n: attention is computed
once per distinct 16-bit value (bucket, see `buckets`) and gathered. Each weight still gets its own gradient:
dL/dw_i = a(u_i) * g_i + b(u_i), where g_i is the upstream gradient of weight i, a(u) the derivative of the soft
weight at bucket u and b(u) the shared path through the centroids. On CPU (float32) the loop over the buckets runs in
the fused kernel with the counts as importance, and its backward (a and b per bucket) in the kernel's
`backward_buckets`: the torch loop here is their reference.
"""

from __future__ import annotations

import itertools

import torch

from . import fused
from .attention import attention, blocks, mix_centroids, outer, reduce_vectors
from .buckets import Buckets, bucket_dtype_for, bucket_index

_TINY = 1e-30
IMPLEMENTATIONS = ("chunked", "uniquified", "fused")
# "auto" takes the uniquified path (cluster_dim 1) from this many vectors per LUT: against the chunked path
# (benchmarks/dkm_paths.py), against the fused kernel (which took 0.62x the uniquified path's time at 32k weights
# per LUT, 1.19x at 131k, 1.65x at 524k: 768x3072 weights at 4 bits, 3 iterations, one thread, the uniquified loop in
# torch). With that loop in the CPU kernel, the uniquified path is the faster one on CPU from ~24k weights per LUT at
# 4 bits (0.83x the fused kernel's time at 32k, 0.37x at 131k) and below 8k at 8 bits; the threshold stays, so that a
# layer keeps the exact float32 attention (not its float16 values') up to the size it always had.
UNIQUIFY_MIN_WEIGHTS = 1 << 13
UNIQUIFY_MIN_WEIGHTS_FUSED = 1 << 17
# Device types whose early stop is checked on the host after each iteration (a cheap synchronisation there).
HOST_EARLY_STOP = ("cpu",)
ATTENTION_CACHE_BYTES = 1 << 28


def _softmax_backward(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dz for A = softmax over dim 1 (centroids) of z, given dL/dA = grad; both (g, k, m). Overwrites grad."""
    return grad.sub_((a * grad).sum(1, keepdim=True)).mul_(a)


def _distance_backward(dz: torch.Tensor, w: torch.Tensor, c: torch.Tensor, tau: float):
    """Pull dL/dz back through z_ji = -||w_i - c_j||^2 / tau, for dz (g, k, m), w (g, m, d), c (g, k, d).

    Returns (dL/dw (g, m, d), dL/dc (g, k, d) summed over the vectors).
    """
    dw = (mix_centroids(dz, c) - w * dz.sum(1).unsqueeze(-1)) * (2.0 / tau)
    dc = (reduce_vectors(dz, w) - c * dz.sum(2, keepdim=True)) * (2.0 / tau)
    return dw, dc


def _group(value, gs: slice):
    """A per-group setting (a float, or a (G, 1, 1) tensor) for the groups of a block."""
    return value[gs] if isinstance(value, torch.Tensor) else value


class _AttentionCache:
    """The attention blocks of one pass over a layer, kept (on CPU, up to ATTENTION_CACHE_BYTES) for the next pass
    that needs the same attention: the soft output after the last iteration, and the last iteration of backward after
    dL/dC_T. Saves one of every two attention evaluations in each of them."""

    def __init__(self, w: torch.Tensor, k: int):
        size = w.shape[0] * w.shape[1] * k * w.element_size()
        self.enabled = w.device.type == "cpu" and size <= ATTENTION_CACHE_BYTES
        self.blocks: list[torch.Tensor] = []

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.blocks.append(a)
        return a

    def replay(self):
        """The kept blocks in order, or None for each block when nothing was kept."""
        return iter(self.blocks) if self.enabled else itertools.repeat(None)


def _iterate(w, c0, tau, max_iters, epsilon, weight=None):
    """The centroid loop without autograd.

    Returns the history [C_0, ..., C_S], the masses [m_1, ..., m_S], T (S = T on CPU; S = max_iters elsewhere, with
    T a 0-d device tensor) and the attention cache of the last iteration.
    """
    G, n, d = w.shape
    k = c0.shape[1]
    on_host = w.device.type in HOST_EARLY_STOP
    weighted = None if weight is None else (weight.unsqueeze(-1) * w, weight.unsqueeze(-1))
    history, masses, moved = [c0], [], []
    c = c0
    for _ in range(max_iters):
        s = torch.zeros_like(c)
        m = torch.zeros(G, k, 1, dtype=c.dtype, device=c.device)
        cache = _AttentionCache(w, k) if on_host else None
        for gs, ms in blocks(G, n, k, w.device):
            a = attention(w[gs, ms], c[gs], _group(tau, gs))  # (g, k, m)
            if cache is not None:
                cache.keep(a)
            if weighted is None:
                s[gs] += reduce_vectors(a, w[gs, ms])
                m[gs] += a.sum(2, keepdim=True)
            else:
                s[gs] += reduce_vectors(a, weighted[0][gs, ms])
                m[gs] += reduce_vectors(a, weighted[1][gs, ms])
        m = m.squeeze(-1)
        c_new = torch.where((m > _TINY).unsqueeze(-1), s / m.clamp_min(_TINY).unsqueeze(-1), c)
        history.append(c_new)
        masses.append(m)
        # the largest centroid move relative to its group's epsilon: converged when <= 1
        change = ((c_new - c).abs().amax((1, 2), keepdim=True) / epsilon).amax() if c.numel() else c.new_zeros(())
        c = c_new
        if on_host:
            if change.item() <= 1:
                break
        else:
            moved.append(change)
    if on_host:
        return history, masses, len(masses), cache
    converged = torch.stack(moved) <= 1
    first = torch.where(converged.any(), converged.int().argmax() + 1, max_iters)
    return history, masses, first, None


def _select(history, T):
    """(C_{T-1}, C_T); T is an int or a 0-d device tensor (picked without a host synchronisation)."""
    if isinstance(T, int):
        return history[T - 1], history[T]
    stacked = torch.stack(history)
    return stacked.index_select(0, (T - 1).view(1))[0], stacked.index_select(0, T.view(1))[0]


def _soft_output(w, c_in, c_out, tau, cache=None):
    """W~ = A_T C_T, (G, n, d); A_T from `cache` when the last iteration kept it."""
    G, n, _ = w.shape
    out = torch.empty_like(w)
    kept = cache.replay() if cache is not None else itertools.repeat(None)
    for (gs, ms), a in zip(blocks(G, n, c_out.shape[1], w.device), kept):
        if a is None:
            a = attention(w[gs, ms], c_in[gs], _group(tau, gs))
        out[gs, ms] = mix_centroids(a, c_out[gs])
    return out


def _backward(w, history, masses, T, tau, grad_rows, weight=None, direct_per_unit=False, importance=None):
    """Reverse pass of `_iterate` + `_soft_output`, in blocks.

    `grad_rows` (G, n, d) is dL/dW~ summed over the weights each row stands for (one weight per row in the chunked
    path; a whole bucket in the uniquified path, where `weight` holds the bucket counts).
    Returns (b, a): b (G, n, d) is the part of dL/dw shared by every weight of a row; a (G, n, d) is, with
    `direct_per_unit`, the derivative of the soft weight at the row (d = 1; multiply by each weight's own upstream
    gradient), otherwise None and the direct part is already inside b.

    Iterations after T (only on devices where the loop ran all max_iters) receive no gradient: their terms vanish.
    `importance` (G, n, 1): the vectors' sample weights f of an importance-weighted loop (S_t = A_t (f w), m_t =
    A_t f): their terms through S_t and m_t scale by f.
    """
    G, n, d = w.shape
    S = len(masses)
    c_in, c_out = _select(history, T)
    k = c_out.shape[1]
    assert weight is None or direct_per_unit, "bucket weights come with per-unit direct terms"
    assert importance is None or not direct_per_unit, "importance weighs single vectors, not buckets"

    # dL/dC_T from W~ = A_T C_T
    dc_out = torch.zeros_like(c_out)
    cache = _AttentionCache(w, k) if isinstance(T, int) else None
    for gs, ms in blocks(G, n, k, w.device):
        a = attention(w[gs, ms], c_in[gs], _group(tau, gs))
        dc_out[gs] += reduce_vectors(cache.keep(a) if cache is not None else a, grad_rows[gs, ms])

    b = torch.zeros_like(w)
    a_direct = torch.zeros_like(w) if direct_per_unit else None
    dc = torch.zeros_like(c_out)
    for t in range(S, 0, -1):
        if isinstance(T, int):
            direct, mask = t == T, None
            if direct:
                dc = dc + dc_out
        else:  # every iteration might be the last one: its direct terms are masked by [t == T]
            direct, mask = True, (T == t).to(w.dtype)
            dc = dc + dc_out * mask
        c_prev, c_t, m_t = history[t - 1], history[t], masses[t - 1]
        alive = (m_t > _TINY).unsqueeze(-1)
        inv_m = (1.0 / m_t.clamp_min(_TINY)).unsqueeze(-1)
        ds = torch.where(alive, dc * inv_m, 0.0)  # dL/dS_t, S_t = A_t w: (G, k, d)
        dm = torch.where(alive, -(dc * c_t).sum(-1, keepdim=True) * inv_m, 0.0)  # dL/dm_t: (G, k, 1)
        dc_prev = torch.where(alive, 0.0, dc)  # dead clusters carry C_{t-1} over unchanged
        combined = direct and not direct_per_unit  # one softmax backward for both paths (it is linear)
        kept = cache.replay() if cache is not None and t == T else itertools.repeat(None)
        for (gs, ms), a in zip(blocks(G, n, k, w.device), kept):
            wb, cb, tb = w[gs, ms], c_prev[gs], _group(tau, gs)
            if a is None:
                a = attention(wb, cb, tb)  # (g, k, m)
            grad_a = outer(ds[gs], wb).add_(dm[gs])  # through S_t and m_t
            if importance is not None:
                grad_a.mul_(importance[gs, ms].transpose(1, 2))
            if combined:  # through W~ = A_T C_T
                direct_a = outer(c_t[gs], grad_rows[gs, ms])
                grad_a.add_(direct_a if mask is None else direct_a.mul_(mask))
            dz = _softmax_backward(a, grad_a)
            dw, dc_block = _distance_backward(dz, wb, cb, tb)
            mixed = mix_centroids(a, ds[gs])
            b[gs, ms] += (mixed if importance is None else mixed * importance[gs, ms]) + dw
            if not direct_per_unit:
                if t > 1:
                    dc_prev[gs] += dc_block
                continue
            dz_total = dz if weight is None else dz * weight[gs, ms].unsqueeze(1)
            if direct:
                grad_dir = outer(c_t[gs], grad_rows[gs, ms])
                dz_total = dz_total + _softmax_backward(a, grad_dir if mask is None else grad_dir.mul_(mask))
                unit = _softmax_backward(a, c_t[gs].expand_as(a).clone())  # d = 1: dA/dw . C_T
                da = _distance_backward(unit, wb, cb, tb)[0]
                a_direct[gs, ms] += da if mask is None else da * mask
            if t > 1:
                dc_prev[gs] += _distance_backward(dz_total, wb, cb, tb)[1]
        dc = dc_prev
    return b, a_direct


class _ChunkedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, c0, tau, max_iters, epsilon, importance=None):
        with torch.no_grad():
            weight = None if importance is None else importance.squeeze(-1)
            history, masses, T, cache = _iterate(w, c0, tau, max_iters, epsilon, weight=weight)
            c_in, c_out = _select(history, T)
            out = _soft_output(w, c_in, c_out, tau, cache)
        T_saved = [T] if isinstance(T, torch.Tensor) else []
        ctx.importance = importance  # an input that needs no gradient: kept as it is
        ctx.save_for_backward(w, *history, *masses, *T_saved)
        ctx.tau, ctx.S, ctx.T = tau, len(masses), None if T_saved else T
        c_final = c_out.clone()
        ctx.mark_non_differentiable(c_final)
        return out, c_final

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        saved = ctx.saved_tensors
        S = ctx.S
        w, history, masses = saved[0], list(saved[1 : S + 2]), list(saved[S + 2 : 2 * S + 2])
        T = ctx.T if ctx.T is not None else saved[-1]
        with torch.no_grad():
            b, _ = _backward(w, history, masses, T, ctx.tau, grad_out, importance=ctx.importance)
        return b, None, None, None, None, None


class _UniquifiedDKM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, c0, tau, max_iters, epsilon, bucket_dtype):
        with torch.no_grad():
            buckets = bucket_index(w.squeeze(-1), bucket_dtype)
            u = buckets.values.unsqueeze(-1)
            weight = buckets.counts.to(w.dtype)
            kernels = fused.cpu_kernels() if u.device.type == "cpu" and u.dtype == torch.float32 else None
            if kernels is not None:  # the loop over the buckets in the CPU kernel, the counts as importance
                G = u.shape[0]
                tau = fused.per_group(tau, G, u.device)
                out_u, c_out, stacked, masses, T = kernels.forward(
                    u.contiguous(), c0.contiguous(), tau, fused.per_group(epsilon, G, u.device), max_iters, weight
                )
                history, masses, T_saved = [stacked], [masses], [T]
            else:
                history, masses, T, cache = _iterate(u, c0, tau, max_iters, epsilon, weight=weight)
                c_in, c_out = _select(history, T)
                out_u = _soft_output(u, c_in, c_out, tau, cache)
                T_saved = [T] if isinstance(T, torch.Tensor) else []
            out = buckets.gather(out_u.view(-1)).view_as(w)
        ctx.save_for_backward(u, weight, buckets.index, buckets.present, *history, *masses, *T_saved)
        ctx.tau, ctx.S, ctx.T, ctx.kernel = tau, len(masses), None if T_saved else T, kernels is not None
        c_final = c_out.clone()
        ctx.mark_non_differentiable(c_final)
        return out, c_final

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        saved = ctx.saved_tensors
        S = ctx.S
        u, weight, index, present = saved[:4]
        buckets = Buckets(u.squeeze(-1), weight, index, present)
        with torch.no_grad():
            g = grad_out.reshape(-1)
            g_rows = buckets.sums(g).view_as(u)
            if ctx.kernel:  # saved: the kernel's (history, masses, T)
                sums = g_rows.float().contiguous()
                b, a = fused.cpu_kernels().backward_buckets(u, sums, weight, *saved[4:], ctx.tau)
            else:
                history, masses = list(saved[4 : S + 5]), list(saved[S + 5 : 2 * S + 5])
                T = ctx.T if ctx.T is not None else saved[-1]
                b, a = _backward(u, history, masses, T, ctx.tau, g_rows, weight=weight, direct_per_unit=True)
            grad_w = buckets.grad(a.view(-1), b.view(-1), g)  # dL/dw_i = a(u_i) * g_i + b(u_i)
        return grad_w.view_as(grad_out), None, None, None, None, None


def choose_implementation(implementation: str, w: torch.Tensor, weighted: bool = False) -> str:
    """The path `dkm_cluster` runs for vectors `w` (G, n, d). "auto": "uniquified" for d = 1 with many vectors per LUT
    (UNIQUIFY_MIN_WEIGHTS_FUSED where a fused kernel serves w's device and dtype, else UNIQUIFY_MIN_WEIGHTS), else the
    fused kernel where one serves w, else "chunked". "fused" where no kernel serves w: "chunked" (the same math).
    A `weighted` (importance-weighted) loop has no uniquified path: "chunked" when asked for, else as "fused"."""
    if implementation not in ("auto", *IMPLEMENTATIONS):
        choices = ["auto", *IMPLEMENTATIONS]
        raise ValueError(f"unknown DKM implementation {implementation!r}; use one of {choices}")
    if weighted and implementation != "chunked":
        implementation = "fused"
    if implementation not in ("auto", "fused"):
        return implementation
    kernel = fused.available(w)
    if implementation == "auto":
        many = UNIQUIFY_MIN_WEIGHTS_FUSED if kernel else UNIQUIFY_MIN_WEIGHTS
        if w.shape[-1] == 1 and w.shape[1] >= many:
            return "uniquified"
    return "fused" if kernel else "chunked"


def dkm_cluster(
    w: torch.Tensor,
    centroids: torch.Tensor,
    tau: float | torch.Tensor,
    max_iters: int,
    epsilon: float | torch.Tensor,
    implementation: str = "chunked",
    bucket_dtype: torch.dtype | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-cluster w (G, n, d) starting from `centroids` (G, k, d).

    Returns (W~, C_T): the differentiable soft weight and the final centroids (detached), to carry to the next step.
    `tau` and `epsilon` are numbers or one value per group (G,). `implementation` is "chunked" (exact, any d),
    "uniquified" (d = 1; attention per distinct 16-bit value of `bucket_dtype`, by default the weight's own dtype if
    16-bit, else float16), "fused" (the chunked path's math in one fused kernel per iteration, run in float32; chunked
    where no kernel serves w's device and dtype) or "auto" (see `choose_implementation`).

    `importance` (G, n) > 0: each vector's sample weight in the loop, C = (A^T (f w)) / (A^T f) (importance-weighted
    soft k-means, e.g. `ops.kmeans.sample_weights` of the squared gradients). The 16-bit buckets have no per-vector
    weights: a weighted loop runs the fused kernel where one serves w, else (and when "chunked" is asked for) the
    chunked path in float32.
    """
    if importance is not None and tuple(importance.shape) != tuple(w.shape[:2]):
        raise ValueError(f"importance of shape {tuple(importance.shape)} for vectors of shape {tuple(w.shape)}")
    implementation = choose_implementation(implementation, w, weighted=importance is not None)
    if implementation == "fused":
        return fused.dkm(w, centroids, tau, max_iters, epsilon, importance)
    if importance is not None:  # the chunked path: a 16-bit weight loops in float32, as in the fused kernel
        w = w.float() if w.element_size() < 4 else w
        importance = importance.detach().to(w.device, w.dtype).unsqueeze(-1)
    c0 = centroids.detach().to(w.dtype, copy=True)  # saved for backward: never the caller's (updated) buffer
    tau, epsilon = (x.detach().to(w).view(-1, 1, 1) if isinstance(x, torch.Tensor) else x for x in (tau, epsilon))
    if implementation == "uniquified":
        if w.shape[-1] != 1:
            raise ValueError(f"the uniquified DKM path needs cluster_dim 1, got {w.shape[-1]}")
        bucket_dtype = bucket_dtype or bucket_dtype_for(w)
        if bucket_dtype == torch.float16 and w.dtype != torch.float16:
            # float16 keys of w's rounding lose precision below 2**-14 (subnormals: a layer of weights ~1e-5 fell
            # into a few buckets): each group is keyed at a power-of-two scale that takes its largest value to
            # [1, 2), exact in float32 (the loop is the same at any scale once tau and epsilon follow)
            largest = w.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(2.0**-40)
            scale = torch.exp2(-torch.floor(torch.log2(largest)))
            tau, epsilon = tau * scale.square(), epsilon * scale
            out, c_final = _UniquifiedDKM.apply(w * scale, c0 * scale, tau, max_iters, epsilon, bucket_dtype)
            return out / scale, c_final / scale
        return _UniquifiedDKM.apply(w, c0, tau, max_iters, epsilon, bucket_dtype)
    return _ChunkedDKM.apply(w, c0, tau, max_iters, epsilon, importance)
