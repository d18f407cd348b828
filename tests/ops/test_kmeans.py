"""k-means++ / Lloyd initialisation of the centroids."""

from __future__ import annotations

import torch
from reference import weights

from dkm_hf.ops.attention import gather_centroids, hard_assign
from dkm_hf.ops.kmeans import kmeans_init


def test_kmeans_init_deterministic_and_catches_outliers():
    w = weights(1, 5000, 1)
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
