"""Attention softmax, distances and hard assignment."""

from __future__ import annotations

import pytest
import torch

from dkm_hf.ops import attention


@pytest.mark.parametrize("k", [2, 4, 8, 16, 32])
def test_softmax_matches_torch_for_every_centroid_count(k):
    # Below 16 centroids the softmax runs over a transposed copy (faster on CPU); the values must not change.
    z = torch.randn(3, 257, k, generator=torch.Generator().manual_seed(k)) * 40
    out = attention.softmax_last(z)
    assert out.shape == z.shape and out.is_contiguous()
    torch.testing.assert_close(out, torch.softmax(z, dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [1, 3])
def test_attention_rows_sum_to_one_and_hard_assign_is_its_argmax(d):
    g = torch.Generator().manual_seed(d)
    w, c = torch.randn(2, 300, d, generator=g), torch.randn(2, 8, d, generator=g)
    a = attention.attention(w, c, 0.5)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 300))
    assert torch.equal(attention.hard_assign(w, c), a.argmax(-1))
    direct = ((w.unsqueeze(2) - c.unsqueeze(1)) ** 2).sum(-1)
    torch.testing.assert_close(attention.squared_distance(w, c), direct, rtol=1e-5, atol=1e-5)
