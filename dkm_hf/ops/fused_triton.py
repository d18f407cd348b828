"""The fused DKM kernels in Triton (CUDA; CPU tensors under TRITON_INTERPRET=1): `forward` and `backward` compute
what `dkm_fused.cpp` computes, with the same outputs (see `fused.py`).

One iteration (the LLM recipe's `max_iters=1`) over many groups (per-row LUTs) is one launch each way: a program per
group walks its vectors twice, BLOCK_N at a time, the (BLOCK_N, k) attention in registers (the distances, the
softmax in base 2 with the smallest distance subtracted and logits clamped at EXP_FLOOR as in attention.py): forward,
the centroid sums and masses, then the soft weight from the new centroids; backward, dL/dC_T, then dL/dw. The weight,
W~ and the gradients stay in the weight's dtype (the loop runs in float32). Otherwise each program takes BLOCK_N
vectors of one group for one stage (sums, soft weight, one iteration of the backward); the sums go to one slot per
program and are added per group by torch in float64 (deterministic: no atomics), and the loop over iterations runs on
the host, reading the early-stop test back after each iteration (one synchronisation per iteration).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

EXP_FLOOR = -80.0  # attention.EXP_FLOOR (not imported: attention uses the CPU kernels of fused.py; a test checks)

_TINY = 1e-30  # dkm.py _TINY
WHOLE_GROUPS_MIN = 256  # groups from which one program per group keeps the GPU busy (one_launch)
_LOG2E = math.log2(math.e)


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
def _reduce_kernel(
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
def _soft_kernel(
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
def _backward_kernel(
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
    ga = tl.sum(x[:, None, :] * ds[None, :, :], axis=2) + dm[None, :]  # dL/dA through S_t and m_t
    mix = tl.sum(a[:, :, None] * ds[None, :, :], axis=1)
    if HAS_F:  # importance-weighted: the terms through S_t and m_t scale by f
        f = tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)
        ga = ga * f[:, None]
        mix = mix * f[:, None]
    if DIRECT:  # and through W~ = A_T C_T
        gt = _load_rows(grad_ptr, g, offs, mn, dd, md, n, D)
        ct = _load_rows(ct_ptr, g, ks, mk, dd, md, K, D)
        ga += tl.sum(gt[:, None, :] * ct[None, :, :], axis=2)
    dz = (ga - tl.sum(a * ga, axis=1)[:, None]) * a  # softmax backward
    two_tau = 2.0 / tl.load(tau_ptr + g)
    pull = tl.sum(dz[:, :, None] * cp[None, :, :], axis=1)
    add = mix + (pull - x * tl.sum(dz, axis=1)[:, None]) * two_tau
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
def _one_iteration_kernel(
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
def _one_iteration_backward_kernel(
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
    W~ = A C_1 and through C_1's sums (the `_backward_kernel` of the last iteration with DIRECT), in w's dtype."""
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
        ga = tl.sum(x[:, None, :] * ds[None, :, :], axis=2) + dm[None, :]  # dL/dA through S_1 and m_1
        mix = tl.sum(a[:, :, None] * ds[None, :, :], axis=1)
        if HAS_F:
            f = tl.load(f_ptr + g * n + offs, mask=mn, other=0.0)
            ga = ga * f[:, None]
            mix = mix * f[:, None]
        ga += tl.sum(gt[:, None, :] * ct[None, :, :], axis=2)  # and through W~ = A C_1
        dz = (ga - tl.sum(a * ga, axis=1)[:, None]) * a
        pull = tl.sum(dz[:, :, None] * cp[None, :, :], axis=1)
        b = mix + (pull - x * tl.sum(dz, axis=1)[:, None]) * two_tau
        b_ptrs = b_ptr + (g * n + offs)[:, None] * D + dd[None, :]
        tl.store(b_ptrs, b.to(b_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])


def _geometry(w: torch.Tensor, k: int) -> tuple[dict, int]:
    """The kernels' block sizes and the number of blocks per group: (BLOCK_N, k, d) products of at most 8,192."""
    _, n, d = w.shape
    k_pad, d_pad = triton.next_power_of_2(k), triton.next_power_of_2(d)
    block = max(16, min(1024, triton.next_power_of_2(n), 8192 // (k_pad * d_pad)))
    meta = {"BLOCK_N": block, "K_PAD": k_pad, "D_PAD": d_pad, "EXP2_FLOOR": EXP_FLOOR * _LOG2E}
    return meta, triton.cdiv(n, block)


def one_launch(G: int, nb: int, iterations: int) -> bool:
    """Whether a loop of `iterations` over G groups of nb blocks runs as one launch each way (a program per group):
    for one iteration where the groups are many (per-row LUTs) or short; a few long groups (per-tensor LUTs) keep a
    program per block, for the parallelism."""
    return iterations == 1 and (G >= WHOLE_GROUPS_MIN or nb <= 4)


def _group_sums(parts: torch.Tensor, G: int, nb: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program slots -> (sum a y (G, k, d), sum a (G, k)), added in float64."""
    sums = parts.view(G, nb, k * (d + 1)).double().sum(1).float()
    return sums[:, : k * d].reshape(G, k, d), sums[:, k * d :]


def forward(
    w: torch.Tensor, c0: torch.Tensor, tau: torch.Tensor, epsilon: torch.Tensor, max_iters: int, importance=None
):
    """(W~, C_T, history, masses, T) as `fused.fused_dkm`, for contiguous w (G, n, d) (float32, bfloat16 or float16;
    W~ in its dtype), float32 c0 (G, k, d) and importance (G, n) or None."""
    G, n, d = w.shape
    k = c0.shape[1]
    meta, nb = _geometry(w, k)
    if one_launch(G, nb, max_iters):
        history, masses, c_final = c0.new_empty(2, G, k, d), c0.new_empty(1, G, k), c0.new_empty(G, k, d)
        out = torch.empty_like(w)
        f = w if importance is None else importance  # any pointer where HAS_F is off
        _one_iteration_kernel[(G,)](
            w, f, tau, c0, history, masses, c_final, out, G, n, k, d, HAS_F=importance is not None, TINY=_TINY, **meta
        )
        return out, c_final, history, masses, torch.ones((), dtype=torch.int64, device=w.device)
    out, *rest = _forward_per_block(w.float(), c0, tau, epsilon, max_iters, importance, meta, nb)
    return out.to(w.dtype), *rest


def _forward_per_block(w, c0, tau, epsilon, max_iters, importance, meta, nb):
    G, n, d = w.shape
    k = c0.shape[1]
    q = (_LOG2E / tau).contiguous()
    history = w.new_empty(max_iters + 1, G, k, d)
    masses = w.new_zeros(max_iters, G, k)
    history[0] = c0
    parts = w.new_empty(G * nb * k * (d + 1))
    T = max_iters
    f = w if importance is None else importance  # any pointer where HAS_F is off
    for t in range(1, max_iters + 1):
        c = history[t - 1]
        _reduce_kernel[(G * nb,)](w, w, f, c, q, parts, n, k, d, nb, HAS_Y=False, HAS_F=importance is not None, **meta)
        s, m = _group_sums(parts, G, nb, k, d)
        history[t] = torch.where((m > _TINY).unsqueeze(-1), s / m.clamp_min(_TINY).unsqueeze(-1), c)
        masses[t - 1] = m
        if t == max_iters:  # T = max_iters either way: no host synchronisation (none at all for max_iters = 1)
            break
        change = ((history[t] - c).abs().amax((1, 2)) / epsilon).amax()
        if change.item() <= 1:
            T = t
            break
    history[T + 1 :] = history[T]
    out = torch.empty_like(w)
    _soft_kernel[(G * nb,)](w, history[T - 1], history[T], q, out, n, k, d, nb, **meta)
    return out, history[T].clone(), history, masses, torch.full((), T, dtype=torch.int64, device=w.device)


def backward(w, grad, history, masses, T, tau, importance=None):
    """dL/dw as `fused.fused_dkm_backward`, in w's dtype (grad: contiguous, of w's shape)."""
    G, n, d = w.shape
    k = history.shape[2]
    meta, nb = _geometry(w, k)
    if one_launch(G, nb, masses.shape[0]):
        b = torch.empty_like(w)
        f = w if importance is None else importance
        _one_iteration_backward_kernel[(G,)](
            w, grad, f, history, masses, tau, b, G, n, k, d, HAS_F=importance is not None, TINY=_TINY, **meta
        )
        return b
    return _backward_per_block(w.float(), grad.float(), history, masses, T, tau, importance, meta, nb).to(w.dtype)


def _backward_per_block(w, grad, history, masses, T, tau, importance, meta, nb):
    G, n, d = w.shape
    k = history.shape[2]
    T = 1 if masses.shape[0] == 1 else int(T)  # one iteration: T = 1 without a host synchronisation
    q = (_LOG2E / tau).contiguous()
    parts = w.new_empty(G * nb * k * (d + 1))
    _reduce_kernel[(G * nb,)](w, grad, w, history[T - 1], q, parts, n, k, d, nb, HAS_Y=True, HAS_F=False, **meta)
    dc = _group_sums(parts, G, nb, k, d)[0]  # dL/dC_T
    b = torch.zeros_like(w)
    two_tau = (2.0 / tau).view(G, 1, 1)
    for t in range(T, 0, -1):
        c_prev, c_t, m_t = history[t - 1], history[t], masses[t - 1]
        alive = (m_t > _TINY).unsqueeze(-1)
        inv_m = (1.0 / m_t.clamp_min(_TINY)).unsqueeze(-1)
        ds = torch.where(alive, dc * inv_m, 0.0).contiguous()
        dm = torch.where(alive, -(dc * c_t).sum(-1, keepdim=True) * inv_m, 0.0).squeeze(-1).contiguous()
        _backward_kernel[(G * nb,)](
            w,
            grad,
            w if importance is None else importance,
            c_prev,
            c_t,
            ds,
            dm,
            q,
            tau,
            b,
            parts,
            n,
            k,
            d,
            nb,
            DIRECT=t == T,
            WANT_DC=t > 1,
            HAS_F=importance is not None,
            **meta,
        )
        dc_prev = torch.where(alive, 0.0, dc)
        if t > 1:
            zw, zs = _group_sums(parts, G, nb, k, d)
            dc_prev = dc_prev + (zw - c_prev * zs.unsqueeze(-1)) * two_tau
        dc = dc_prev
    return b
