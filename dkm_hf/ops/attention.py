"""Distances, the DKM attention softmax and nearest-centroid assignment, batched over LUT groups.

Shapes: vectors `w` are (G, m, d) (G LUT groups, m vectors of d = cluster_dim values), centroids `c` are (G, k, d).
Large tensors are processed in row chunks so that a chunk's (G, rows, k) temporaries stay under `CHUNK_ELEMENTS`.

Two CPU kernels are slow at DKM's shapes and are sidestepped on CPU only (on CUDA the direct call is used):
softmax over a last dimension of a few centroids, and matmuls with a long inner and a narrow outer dimension.
"""

from __future__ import annotations

import torch

# Rows per chunk are chosen so a chunk's (G, rows, k) temporaries stay under this many elements.
CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(k: int, d: int, groups: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, k * d * groups))


def chunks(n: int, step: int):
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


def softmax_last(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a (G, m, k) tensor, contiguous.

    torch's CPU softmax vectorises along the softmax dimension, which is slow for the few centroids of 1-3 bit
    LUTs (66 ms for 1M rows of 4 at one thread); over the transposed, contiguous (G, k, m) copy it vectorises along
    the rows instead (12 ms). From 16 centroids on, and on GPUs, the direct call is as fast or faster.
    """
    if z.shape[-1] >= 16 or z.device.type != "cpu":
        return torch.softmax(z, dim=-1)
    return torch.softmax(z.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2).contiguous()


def attention(w: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax_j(-||w_i - c_j||^2 / tau) for w (G, m, d) and c (G, k, d) -> (G, m, k).

    For d > 1 the row constant -||w_i||^2 / tau is dropped (softmax does not see it), which leaves one fused
    batched matmul for the logits (2 w.c - ||c||^2) / tau: two passes over the (m, k) array instead of five.
    """
    if w.shape[-1] == 1:
        return softmax_last(squared_distance(w, c) / -tau)
    bias = c.square().sum(-1).unsqueeze(1)  # (G, 1, k)
    return softmax_last(torch.baddbmm(bias, w, c.transpose(1, 2), beta=-1.0 / tau, alpha=2.0 / tau))


def t_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for a (G, m, k) and b (G, m, d) -> (G, k, d).

    On CPU computed as (b^T a)^T: the kernels handle the long inner dimension much better in this orientation when
    d is small (0.19 ms against 2.6 ms for m = 8192, k = 256, d = 2 at one thread).
    """
    if a.device.type != "cpu":
        return a.transpose(1, 2) @ b
    return (b.transpose(1, 2) @ a).transpose(1, 2)


def matmul_narrow(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a c for a (G, m, k) and a narrow c (G, k, d) -> (G, m, d); on CPU as (c^T a^T)^T, 2.3x faster for d = 2."""
    if a.device.type != "cpu":
        return a @ c
    return (c.transpose(1, 2) @ a.transpose(1, 2)).transpose(1, 2)


def hard_assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every vector: w (G, n, d), c (G, k, d) -> (G, n) int64."""
    G, n, d = w.shape
    step = rows_per_chunk(centroids.shape[1], d, G)
    idx = torch.empty(G, n, dtype=torch.int64, device=w.device)
    c = centroids.to(w.dtype)
    for sl in chunks(n, step):
        idx[:, sl] = squared_distance(w[:, sl], c).argmin(-1)
    return idx


def gather_centroids(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """indices (G, n), lut (G, k, d) -> (G, n, d)."""
    return torch.gather(lut, 1, indices.unsqueeze(-1).expand(-1, -1, lut.shape[-1]))
