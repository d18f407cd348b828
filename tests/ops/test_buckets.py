"""Distinct 16-bit values per LUT group (uniquification)."""

from __future__ import annotations

import pytest
import torch

from dkm_hf.ops import fused
from dkm_hf.ops.buckets import Buckets, bucket_dtype_for, bucket_index, unique_buckets


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


needs_kernels = pytest.mark.skipif(fused.cpu_kernels() is None, reason="the CPU kernels could not be built")


@needs_kernels
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keyed_buckets_equal_the_inverse_ones(dtype, groups):
    """The kernel path (keys used as indices, a table per LUT group) gives unique_buckets' buckets and the same
    per-weight results; groups of other spreads hold other numbers of buckets (padded with count 0). Before, stacked
    experts (G > 1) took unique_buckets' int64 sort of every weight in each step (4 GB for a 100M-weight tensor)."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.05, 0.002, 0.5][:groups]).unsqueeze(1)
    w = (torch.randn(groups, 70_001, generator=gen) * spread).to(dtype)  # 16-bit values repeat: buckets of many
    keyed = bucket_index(w, bucket_dtype_for(w))
    values, counts, inverse = unique_buckets(w, bucket_dtype_for(w))
    assert keyed.present is not None and keyed.index.dtype == torch.int16
    assert torch.equal(keyed.values, values) and torch.equal(keyed.counts, counts)
    plain = Buckets(values, counts, inverse, None)
    per_bucket = torch.randn(values.numel(), generator=gen).to(dtype)
    assert torch.equal(keyed.gather(per_bucket), plain.gather(per_bucket))
    assert torch.equal(keyed.gather(per_bucket), per_bucket[inverse.long()])
    g = torch.randn(w.numel(), generator=gen).to(dtype)
    exact = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, g.double())
    # the kernel sums in double and rounds once to g's dtype; index_add_ rounds at every addition
    torch.testing.assert_close(keyed.sums(g), exact.to(dtype), atol=0, rtol=torch.finfo(dtype).eps)
    assert (plain.sums(g).double() - exact).abs().max() >= (keyed.sums(g).double() - exact).abs().max()
    a, b = (torch.randn(values.numel(), generator=gen) for _ in range(2))
    expected = a.double()[inverse.long()] * g.double() + b.double()[inverse.long()]
    got = keyed.grad(a, b, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected.to(dtype).double())


@needs_kernels
def test_keyed_buckets_fall_back_to_bfloat16_beyond_float16_range():
    w = torch.tensor([1e5, -2e5, 0.5, 0.25] * 8).view(1, 32)
    keyed = bucket_index(w, torch.float16)
    assert keyed.present is not None
    assert torch.equal(keyed.gather(keyed.values.view(-1)), w.view(-1).to(torch.bfloat16).float())


def test_weights_the_kernels_do_not_serve_keep_the_inverse():
    """float64 (the kernels' tables are float32), and several groups smaller than KEYED_GROUP (65,536-entry tables
    per group would cost more than they save)."""
    w = torch.tensor([[0.5, 0.5, 0.25, 0.5], [1.0, 2.0, 3.0, 4.0]])
    assert bucket_index(w.double(), torch.float16).present is None
    assert bucket_index(w, torch.float16).present is None


# Behaviours of dkm_hf/ops/buckets.py no other test pinned (a mutation review)


def test_several_groups_beyond_float16_range_fall_back_to_bfloat16_keys():
    """A float32 weight of several LUT groups with values beyond float16's range is keyed in bfloat16, not by its
    float16 rounding (inf)."""
    from dkm_hf.ops.buckets import unique_buckets

    w = torch.tensor([[1e5, -2e5, 0.5, 0.25], [0.5, 0.5, 3.0, -7e4]])
    values, counts, inverse = unique_buckets(w, torch.float16)
    assert torch.isfinite(values).all()
    assert torch.equal(values.view(-1)[inverse.long()], w.view(-1).to(torch.bfloat16).float())


def test_a_float16_weight_keeps_exact_buckets_even_with_an_infinite_value():
    """A float16 weight is its own key (exact, inf included), not re-keyed by bfloat16."""
    from dkm_hf.ops.buckets import unique_buckets

    w = torch.tensor([[0.1, 0.2, float("inf"), 0.1, 0.3]], dtype=torch.float16)
    values, counts, inverse = unique_buckets(w, torch.float16)
    assert torch.equal(values.view(-1)[inverse.long()], w.view(-1))


def test_keyed_buckets_of_groups_with_zeros_and_padding():
    """Per-group keyed buckets of groups of different sizes: the padding keys (0, the key of +0.0) do not overwrite the
    real +0.0 bucket, so weights equal to 0.0 read their own entry."""
    from dkm_hf.ops import fused
    from dkm_hf.ops.buckets import KEYED_GROUP, bucket_index, unique_buckets

    if fused.cpu_kernels() is None:
        pytest.skip("the CPU kernels could not be built")
    n = KEYED_GROUP
    gen = torch.Generator().manual_seed(0)
    few = torch.tensor([0.0, 0.5, -0.25])[torch.randint(0, 3, (n,), generator=gen)]
    many = torch.randn(n, generator=gen)
    w = torch.stack([few, many])  # group 0: 3 buckets, padded to group 1's count
    keyed = bucket_index(w, torch.float16)
    assert keyed.present is not None
    values, counts, inverse = unique_buckets(w, torch.float16)
    per_bucket = torch.randn(values.numel(), generator=gen)
    assert torch.equal(keyed.gather(per_bucket), per_bucket[inverse.long()])
    g = torch.randn(w.numel(), generator=gen)
    expected = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, g.double())
    torch.testing.assert_close(keyed.sums(g).double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(keyed.sums(g).view(2, -1)[counts == 0], torch.zeros(int((counts == 0).sum())))
