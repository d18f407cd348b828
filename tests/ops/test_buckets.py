"""Distinct 16-bit values per LUT group (uniquification)."""

from __future__ import annotations

import torch

from dkm_hf.ops.buckets import unique_buckets


def test_uniquified_falls_back_to_bfloat16_beyond_float16_range():
    w = torch.tensor([1e5, -2e5, 0.5, 0.25] * 8).view(1, 32, 1)
    values, counts, inverse = unique_buckets(w.squeeze(-1), torch.float16)
    assert torch.isfinite(values).all() and values.abs().max() > 6e4
    assert torch.equal(values.view(-1)[inverse.long()], w.view(-1).to(torch.bfloat16).float())


def test_buckets_per_group_with_padding():
    w = torch.tensor([[0.5, 0.5, 0.25, 0.5], [1.0, 2.0, 3.0, 4.0]])
    values, counts, inverse = unique_buckets(w, torch.float16)
    assert values.shape == counts.shape == (2, 4)
    assert counts.tolist() == [[1, 3, 0, 0], [1, 1, 1, 1]]  # group 0 padded with count 0
    assert torch.equal(values.view(-1)[inverse.long()], w.view(-1))
