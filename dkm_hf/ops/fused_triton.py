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

from .triton_kernels import (
    backward_kernel,
    one_iteration_backward_kernel,
    one_iteration_kernel,
    reduce_kernel,
    soft_kernel,
)

EXP_FLOOR = -80.0  # attention.EXP_FLOOR (not imported: attention uses the CPU kernels of fused.py; a test checks)

_TINY = 1e-30  # dkm.py _TINY
WHOLE_GROUPS_MIN = 256  # groups from which one program per group keeps the GPU busy (one_launch)
_LOG2E = math.log2(math.e)


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
        one_iteration_kernel[(G,)](
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
        reduce_kernel[(G * nb,)](w, w, f, c, q, parts, n, k, d, nb, HAS_Y=False, HAS_F=importance is not None, **meta)
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
    soft_kernel[(G * nb,)](w, history[T - 1], history[T], q, out, n, k, d, nb, **meta)
    return out, history[T].clone(), history, masses, torch.full((), T, dtype=torch.int64, device=w.device)


def backward(w, grad, history, masses, T, tau, importance=None):
    """dL/dw as `fused.fused_dkm_backward`, in w's dtype (grad: contiguous, of w's shape)."""
    G, n, d = w.shape
    k = history.shape[2]
    meta, nb = _geometry(w, k)
    if one_launch(G, nb, masses.shape[0]):
        b = torch.empty_like(w)
        f = w if importance is None else importance
        one_iteration_backward_kernel[(G,)](
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
    reduce_kernel[(G * nb,)](w, grad, w, history[T - 1], q, parts, n, k, d, nb, HAS_Y=True, HAS_F=False, **meta)
    dc = _group_sums(parts, G, nb, k, d)[0]  # dL/dC_T
    b = torch.zeros_like(w)
    two_tau = (2.0 / tau).view(G, 1, 1)
    for t in range(T, 0, -1):
        c_prev, c_t, m_t = history[t - 1], history[t], masses[t - 1]
        alive = (m_t > _TINY).unsqueeze(-1)
        inv_m = (1.0 / m_t.clamp_min(_TINY)).unsqueeze(-1)
        ds = torch.where(alive, dc * inv_m, 0.0).contiguous()
        dm = torch.where(alive, -(dc * c_t).sum(-1, keepdim=True) * inv_m, 0.0).squeeze(-1).contiguous()
        backward_kernel[(G * nb,)](
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
