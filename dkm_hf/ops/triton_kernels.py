"""The Triton kernels (device code) of `fused_triton.py`, which chooses among them and launches them.

Each loads vectors of one LUT group BLOCK_N at a time and keeps their (BLOCK_N, k) attention in registers
(`_attention`: the squared distances, the softmax in base 2 with the smallest distance subtracted, logits clamped at
EXP2_FLOOR).
A program per group (`one_iteration_kernel`, `one_iteration_backward_kernel`): one iteration and the soft weight, or
its backward, in one launch. A program per block of a group: the sums of an iteration into per-program slots
(`reduce_kernel`), the soft weight (`soft_kernel`), one iteration of the backward (`backward_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attention(x, c, mk, q, EXP2_FLOOR: tl.constexpr):
    """x (BLOCK_N, D_PAD), c (K_PAD, D_PAD) -> softmax over the centroids (BLOCK_N, K_PAD), padded centroids 0."""
    diff = x[:, None, :] - c[None, :, :]
    dist = tl.sum(diff * diff, axis=2)
    dist = tl.where(mk[None, :], dist, float("inf"))
    lo = tl.min(dist, axis=1)
    z = tl.maximum((lo[:, None] - dist) * q, EXP2_FLOOR)
    e = tl.where(mk[None, :], tl.exp2(z), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _load_rows(ptr, g, offs, mn, cols, mc, rows, D):
    return tl.load(ptr + (g * rows + offs)[:, None] * D + cols[None, :], mask=mn[:, None] & mc[None, :], other=0.0)


@triton.jit
def _gradient(x, a, cp, ds, dm, f, gt, ct, two_tau, HAS_F: tl.constexpr, DIRECT: tl.constexpr):
    """For BLOCK_N vectors x with attention a (from centroids cp) in iteration t: (what iteration t adds to dL/dx, the
    softmax's dz): the terms through S_t and m_t (ds, dm; scaled by the importance f with HAS_F) and, with DIRECT,
    through W~ = A_T C_T (gt: dL/dW~, ct: C_T)."""
    ga = tl.sum(x[:, None, :] * ds[None, :, :], axis=2) + dm[None, :]  # dL/dA through S_t and m_t
    mix = tl.sum(a[:, :, None] * ds[None, :, :], axis=1)
    if HAS_F:  # importance-weighted: the terms through S_t and m_t scale by f
        ga = ga * f[:, None]
        mix = mix * f[:, None]
    if DIRECT:  # and through W~ = A_T C_T
        ga += tl.sum(gt[:, None, :] * ct[None, :, :], axis=2)
    # softmax backward, relative to the nearest centroid's ga (any one value per vector gives the same dz): the mean is
    # formed from differences that vanish with their a at a small tau, not as ga_nearest plus an ulp times 2 / tau
    ref = tl.max(tl.where(a == tl.max(a, axis=1)[:, None], ga, float("-inf")), axis=1)
    ga = ga - ref[:, None]
    dz = (ga - tl.sum(a * ga, axis=1)[:, None]) * a
    pull = tl.sum(dz[:, :, None] * cp[None, :, :], axis=1)
    return mix + (pull - x * tl.sum(dz, axis=1)[:, None]) * two_tau, dz


@triton.jit
def reduce_kernel(
    w_ptr,
    y_ptr,
    f_ptr,
    c_ptr,
    q_ptr,
    part_ptr,
    n,
    K,
    D,
    NB,
    HAS_Y: tl.constexpr,
    HAS_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    EXP2_FLOOR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g, blk = pid // NB, pid % NB
    offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ks, dd = tl.arange(0, K_PAD), tl.arange(0, D_PAD)
    mn, mk, md = offs < n, ks < K, dd < D
    x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D)
    c = _load_rows(c_ptr, g, ks, mk, dd, md, K, D)
    a = _attention(x, c, mk, tl.load(q_ptr + g), EXP2_FLOOR)
    a = tl.where(mn[:, None], a, 0.0)
    if HAS_F:  # importance-weighted: sums of f a y and f a
        a = a * tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)[:, None]
    y = x
    if HAS_Y:
        y = _load_rows(y_ptr, g, offs, mn, dd, md, n, D)
    s = tl.sum(a[:, :, None] * y[:, None, :], axis=0)
    base = part_ptr + pid * K * (D + 1)
    tl.store(base + ks[:, None] * D + dd[None, :], s, mask=mk[:, None] & md[None, :])
    tl.store(base + K * D + ks, tl.sum(a, axis=0), mask=mk)


@triton.jit
def soft_kernel(
    w_ptr,
    c_ptr,
    co_ptr,
    q_ptr,
    out_ptr,
    n,
    K,
    D,
    NB,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    EXP2_FLOOR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g, blk = pid // NB, pid % NB
    offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ks, dd = tl.arange(0, K_PAD), tl.arange(0, D_PAD)
    mn, mk, md = offs < n, ks < K, dd < D
    x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D)
    a = _attention(x, _load_rows(c_ptr, g, ks, mk, dd, md, K, D), mk, tl.load(q_ptr + g), EXP2_FLOOR)
    co = _load_rows(co_ptr, g, ks, mk, dd, md, K, D)
    out = tl.sum(a[:, :, None] * co[None, :, :], axis=1)
    tl.store(out_ptr + (g * n + offs)[:, None] * D + dd[None, :], out, mask=mn[:, None] & md[None, :])


@triton.jit
def backward_kernel(
    w_ptr,
    grad_ptr,
    f_ptr,
    cp_ptr,
    ct_ptr,
    ds_ptr,
    dm_ptr,
    q_ptr,
    tau_ptr,
    b_ptr,
    part_ptr,
    n,
    K,
    D,
    NB,
    DIRECT: tl.constexpr,
    WANT_DC: tl.constexpr,
    HAS_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    EXP2_FLOOR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g, blk = pid // NB, pid % NB
    offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ks, dd = tl.arange(0, K_PAD), tl.arange(0, D_PAD)
    mn, mk, md = offs < n, ks < K, dd < D
    x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D)
    cp = _load_rows(cp_ptr, g, ks, mk, dd, md, K, D)
    a = _attention(x, cp, mk, tl.load(q_ptr + g), EXP2_FLOOR)
    ds = _load_rows(ds_ptr, g, ks, mk, dd, md, K, D)
    dm = tl.load(dm_ptr + g * K + ks, mask=mk, other=0.0)
    f = x  # read only with HAS_F
    if HAS_F:
        f = tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)
    gt, ct = x, cp  # read only with DIRECT
    if DIRECT:
        gt = _load_rows(grad_ptr, g, offs, mn, dd, md, n, D)
        ct = _load_rows(ct_ptr, g, ks, mk, dd, md, K, D)
    add, dz = _gradient(x, a, cp, ds, dm, f, gt, ct, 2.0 / tl.load(tau_ptr + g), HAS_F, DIRECT)
    b_ptrs = b_ptr + (g * n + offs)[:, None] * D + dd[None, :]
    bm = mn[:, None] & md[None, :]
    tl.store(b_ptrs, tl.load(b_ptrs, mask=bm, other=0.0) + add, mask=bm)
    if WANT_DC:
        dz = tl.where(mn[:, None], dz, 0.0)
        base = part_ptr + pid * K * (D + 1)
        zw = tl.sum(dz[:, :, None] * x[:, None, :], axis=0)
        tl.store(base + ks[:, None] * D + dd[None, :], zw, mask=mk[:, None] & md[None, :])
        tl.store(base + K * D + ks, tl.sum(dz, axis=0), mask=mk)


@triton.jit
def one_iteration_kernel(
    w_ptr,
    f_ptr,
    tau_ptr,
    c0_ptr,
    hist_ptr,
    m_ptr,
    ct_ptr,
    out_ptr,
    G,
    n,
    K,
    D,
    HAS_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    EXP2_FLOOR: tl.constexpr,
    TINY: tl.constexpr,
):
    """One DKM iteration of group g, then its soft weight: C_1 = A(C_0)^T (f w) / A(C_0)^T f, W~ = A(C_0) C_1; writes
    W~ (w's dtype), history (C_0, C_1), C_T (= C_1) and masses[0]."""
    g = tl.program_id(0).to(tl.int64)
    ks, dd = tl.arange(0, K_PAD), tl.arange(0, D_PAD)
    mk, md = ks < K, dd < D
    c = _load_rows(c0_ptr, g, ks, mk, dd, md, K, D)
    q = 1.4426950408889634 / tl.load(tau_ptr + g)
    s = tl.zeros((K_PAD, D_PAD), dtype=tl.float32)
    m = tl.zeros((K_PAD,), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mn = offs < n
        x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        a = tl.where(mn[:, None], _attention(x, c, mk, q, EXP2_FLOOR), 0.0)
        if HAS_F:
            a = a * tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)[:, None]
        s += tl.sum(a[:, :, None] * x[:, None, :], axis=0)
        m += tl.sum(a, axis=0)
    c1 = tl.where((m > TINY)[:, None], s / tl.maximum(m, TINY)[:, None], c)
    cm = mk[:, None] & md[None, :]
    tl.store(hist_ptr + (g * K + ks)[:, None] * D + dd[None, :], c, mask=cm)
    tl.store(hist_ptr + ((G + g) * K + ks)[:, None] * D + dd[None, :], c1, mask=cm)
    tl.store(ct_ptr + (g * K + ks)[:, None] * D + dd[None, :], c1, mask=cm)
    tl.store(m_ptr + g * K + ks, m, mask=mk)
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mn = offs < n
        x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        out = tl.sum(_attention(x, c, mk, q, EXP2_FLOOR)[:, :, None] * c1[None, :, :], axis=1)
        o_ptrs = out_ptr + (g * n + offs)[:, None] * D + dd[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])


@triton.jit
def one_iteration_backward_kernel(
    w_ptr,
    grad_ptr,
    f_ptr,
    hist_ptr,
    m_ptr,
    tau_ptr,
    b_ptr,
    G,
    n,
    K,
    D,
    HAS_F: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    EXP2_FLOOR: tl.constexpr,
    TINY: tl.constexpr,
):
    """dL/dw of group g after one iteration: dL/dC_1 = A(C_0)^T grad over the group, then per vector the terms through
    W~ = A C_1 and through C_1's sums (the `backward_kernel` of the last iteration with DIRECT), in w's dtype."""
    g = tl.program_id(0).to(tl.int64)
    ks, dd = tl.arange(0, K_PAD), tl.arange(0, D_PAD)
    mk, md = ks < K, dd < D
    cp = _load_rows(hist_ptr, g, ks, mk, dd, md, K, D)
    ct = _load_rows(hist_ptr, G + g, ks, mk, dd, md, K, D)
    tau = tl.load(tau_ptr + g)
    q = 1.4426950408889634 / tau
    dc = tl.zeros((K_PAD, D_PAD), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mn = offs < n
        x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        gt = _load_rows(grad_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        a = tl.where(mn[:, None], _attention(x, cp, mk, q, EXP2_FLOOR), 0.0)
        dc += tl.sum(a[:, :, None] * gt[:, None, :], axis=0)
    m = tl.load(m_ptr + g * K + ks, mask=mk, other=0.0)
    alive = m > TINY
    inv_m = 1.0 / tl.maximum(m, TINY)
    ds = tl.where(alive[:, None], dc * inv_m[:, None], 0.0)
    dm = tl.where(alive, -tl.sum(dc * ct, axis=1) * inv_m, 0.0)
    two_tau = 2.0 / tau
    for start in range(0, n, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        mn = offs < n
        x = _load_rows(w_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        gt = _load_rows(grad_ptr, g, offs, mn, dd, md, n, D).to(tl.float32)
        a = _attention(x, cp, mk, q, EXP2_FLOOR)
        f = x  # read only with HAS_F
        if HAS_F:
            f = tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)
        b, _ = _gradient(x, a, cp, ds, dm, f, gt, ct, two_tau, HAS_F, True)
        b_ptrs = b_ptr + (g * n + offs)[:, None] * D + dd[None, :]
        tl.store(b_ptrs, b.to(b_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])
