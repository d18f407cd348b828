from __future__ import annotations

import pytest
import torch
from reference import naive_dkm

from dkm_hf import clustering
from dkm_hf.clustering import dkm_cluster, gather_centroids, hard_assign, kmeans_init, unique_buckets


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _weights(groups: int, n: int, d: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, n, d, generator=g, dtype=torch.float64) * 0.05
    w[:, :3] *= 8  # a few outliers, as in real layers
    return w.to(torch.float16).to(dtype) if d == 1 else w.to(dtype)


def test_gradcheck_chunked_float64():
    w = _weights(2, 12, 2, torch.float64).requires_grad_()
    c0 = kmeans_init(w.detach().float(), 4, seed=0).double()
    torch.autograd.gradcheck(lambda x: dkm_cluster(x, c0, 5e-3, 3, 0.0, "chunked")[0], (w,), eps=1e-6, atol=1e-6)


def _assert_matches_reference(w: torch.Tensor, bits: int, iters: int, implementation: str, seed: int) -> None:
    """Values, final centroids and gradients of a fast path within 1e-4 relative of naive autograd."""
    c0 = kmeans_init(w, 2**bits, seed=seed)
    grad = torch.randn_like(w)
    fast, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    y_fast, c_fast = dkm_cluster(fast, c0, 1e-3, iters, 0.0, implementation)
    y_ref, c_ref = naive_dkm(ref, c0, 1e-3, iters, 0.0)
    (y_fast * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert _rel(y_fast, y_ref) < 1e-4
    assert _rel(c_fast, c_ref) < 1e-4
    assert _rel(fast.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("bits", [2, 4])
def test_chunked_matches_naive_reference(groups, d, bits):
    _assert_matches_reference(_weights(groups, 640, d), bits, 5, "chunked", seed=1)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_uniquified_matches_naive_reference(groups, bits):
    w = _weights(groups, 3000, 1)  # float16-representable, with many repeated values
    assert unique_buckets(w.squeeze(-1), torch.float16)[0].shape[1] < 3000
    _assert_matches_reference(w, bits, 4, "uniquified", seed=2)


def test_uniquified_gradient_is_per_weight_not_per_bucket():
    w = torch.full((1, 6, 1), 0.25)  # one bucket
    w[0, 3:] = -0.5
    c0 = torch.tensor([[[0.2], [-0.4]]])
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, 7.0]).view(1, 6, 1)
    fast, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
    (dkm_cluster(fast, c0, 0.05, 3, 0.0, "uniquified")[0] * grad).sum().backward()
    (naive_dkm(ref, c0, 0.05, 3, 0.0)[0] * grad).sum().backward()
    torch.testing.assert_close(fast.grad, ref.grad, rtol=1e-4, atol=1e-7)
    assert len(set(fast.grad[0, :3, 0].tolist())) == 3  # same value, different upstream gradients


def test_small_tau_gives_hard_kmeans_assignment():
    w = _weights(2, 500, 2)
    c = kmeans_init(w, 8, seed=0)
    soft, c_final = dkm_cluster(w, c, 1e-9, 1, 0.0, "chunked")
    hard = gather_centroids(hard_assign(w, c), c_final)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)


def test_early_stop_at_epsilon():
    w = _weights(1, 400, 1)
    c = kmeans_init(w, 4, seed=0)
    _, c_one = dkm_cluster(w, c, 1e-3, 1, 0.0, "chunked")
    _, c_many = dkm_cluster(w, c, 1e-3, 50, 1e9, "chunked")  # huge epsilon: stops after the first iteration
    assert torch.equal(c_one, c_many)


def test_kmeans_init_deterministic_and_catches_outliers():
    w = _weights(1, 5000, 1)
    w[0, 0] = 2.0  # a lone outlier far from every other weight
    a, b = kmeans_init(w, 16, seed=7), kmeans_init(w, 16, seed=7)
    assert torch.equal(a, b)
    assert (a - 2.0).abs().min().item() < 1e-3
    # Reconstruction quality: SQNR of the snapped weights
    snapped = gather_centroids(hard_assign(w, a), a)
    sqnr = 10 * torch.log10(w.square().sum() / (w - snapped).square().sum())
    assert sqnr > 20


def test_kmeans_init_fewer_distinct_values_than_clusters():
    w = torch.tensor([0.1, 0.2, 0.1, 0.2]).view(1, 4, 1)
    c = kmeans_init(w, 8, seed=0)
    assert c.shape == (1, 8, 1) and torch.isfinite(c).all()
    distance_to_data = torch.minimum((c - 0.1).abs(), (c - 0.2).abs())
    assert distance_to_data.max().item() < 1e-3  # duplicated data values, no invented ones


def test_uniquified_falls_back_to_bfloat16_beyond_float16_range():
    w = torch.tensor([1e5, -2e5, 0.5, 0.25] * 8).view(1, 32, 1)
    values, counts, inverse = unique_buckets(w.squeeze(-1), torch.float16)
    assert torch.isfinite(values).all() and values.abs().max() > 6e4
    assert torch.equal(values.view(-1)[inverse.long()], w.view(-1).to(torch.bfloat16).float())


@pytest.mark.parametrize("k", [2, 4, 8, 16, 32])
def test_softmax_matches_torch_for_every_centroid_count(k):
    # Below 16 centroids the softmax runs over a transposed copy (faster on CPU); the values must not change.
    z = torch.randn(3, 257, k, generator=torch.Generator().manual_seed(k)) * 40
    out = clustering._softmax(z)
    assert out.shape == z.shape and out.is_contiguous()
    torch.testing.assert_close(out, torch.softmax(z, dim=-1), rtol=0, atol=1e-6)
