"""Attention softmax, distances and hard assignment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkm_hf.ops import attention, fused


@pytest.mark.parametrize("k", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("tau", [1e-4, 1e-2, 10.0])
def test_attention_is_the_softmax_over_centroids(k, tau):
    """Centroid-major softmax with clamped logits equals torch's softmax of -||w - c||^2 / tau to float precision,
    also when most logits are far below the largest (small tau: the clamp only drops weights below 1e-34)."""
    g = torch.Generator().manual_seed(k)
    w, c = torch.randn(3, 257, 1, generator=g) * 0.2, torch.randn(3, k, 1, generator=g) * 0.2
    reference = torch.softmax(-((w - c.transpose(1, 2)) ** 2) / tau, dim=-1).transpose(1, 2)
    out = attention.attention(w, c, tau)
    assert out.shape == (3, k, 257) and out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [1, 3])
def test_attention_columns_sum_to_one_and_hard_assign_is_its_argmax(d):
    g = torch.Generator().manual_seed(d)
    w, c = torch.randn(2, 300, d, generator=g), torch.randn(2, 8, d, generator=g)
    a = attention.attention(w, c, 0.5)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 300))
    assert torch.equal(attention.hard_assign(w, c), a.argmax(1))
    direct = ((w.unsqueeze(1) - c.unsqueeze(2)) ** 2).sum(-1)
    torch.testing.assert_close(attention.squared_distance(w, c), direct, rtol=1e-5, atol=1e-5)


def test_blocks_cover_the_grid_once_within_the_size():
    for groups, m, k in [(1, 10_000_000, 16), (49152, 576, 16), (3, 5, 256), (1000, 1, 2)]:
        seen = 0
        for gs, ms in attention.blocks(groups, m, k):
            size = (gs.stop - gs.start) * (ms.stop - ms.start)
            assert size * k <= max(attention.CHUNK_ELEMENTS, k)
            seen += size
        assert seen == groups * m


def test_accelerator_blocks_are_larger_and_still_cover_the_grid():
    groups, m, k = 1536, 576, 16  # one per-row 4-bit SmolLM2 MLP matrix: 28 groups per CPU block, one GPU block
    cpu, gpu = list(attention.blocks(groups, m, k, "cpu")), list(attention.blocks(groups, m, k, "cuda"))
    assert len(cpu) == 55 and len(gpu) == 1 and gpu[0] == (slice(0, groups), slice(0, m))
    assert attention.chunk_elements("cuda") == attention.CHUNK_ELEMENTS_ACCELERATOR > attention.CHUNK_ELEMENTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_assign_1d_is_argmin_with_its_ties(dtype):
    """The binary-search assignment of cluster_dim 1 equals argmin over the exact squared distances, including values
    exactly at centroids and at midpoints (argmin: the lower index), duplicate centroids (the first one) and unsorted
    centroids; 16-bit weights and non-finite centroids take the argmin path itself."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        groups, n, k = 1 + trial % 4, 1 + 7 * trial, (2, 3, 8, 16, 256)[trial % 5]
        c = torch.randn(groups, k, 1, generator=g, dtype=dtype)
        if trial % 3 == 0:
            c[:, : k // 2] = c[:, k // 2 : 2 * (k // 2)]  # duplicates
        if trial % 4 == 0:
            c = c.round(decimals=1)  # more duplicates
        cs = c.sort(1).values
        pool = torch.cat([(cs[:, 1:] + cs[:, :-1]) / 2, cs, torch.randn(groups, 8, 1, generator=g, dtype=dtype)], 1)
        w = pool[..., 0].gather(1, torch.randint(0, pool.shape[1], (groups, n), generator=g)).unsqueeze(-1)
        expected = attention.squared_distance(w, c).argmin(1)
        assert torch.equal(attention.hard_assign(w, c), expected)


@pytest.mark.skipif(fused.cpu_kernels() is None, reason="the CPU kernels could not be built")
def test_hard_assign_1d_kernel_equals_the_torch_steps(monkeypatch):
    """The CPU kernel (float32) takes the torch path's steps in one loop: the same indices, also for NaN and infinite
    weights, one centroid per group and many groups split across threads."""
    g = torch.Generator().manual_seed(1)
    for groups, n, k in [(3, 1000, 16), (1, 70_000, 256), (40, 33, 2), (2, 5, 1)]:
        c = torch.randn(groups, k, 1, generator=g).round(decimals=1)  # duplicates
        w = torch.randn(groups, n, 1, generator=g) * 2
        w.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        calls = []
        kernels = fused.cpu_kernels()
        monkeypatch.setattr(kernels, "nearest_sorted", lambda *a, f=kernels.nearest_sorted: calls.append(1) or f(*a))
        got = attention.hard_assign(w, c)
        monkeypatch.undo()
        monkeypatch.setattr(fused, "cpu_kernels", lambda: None)
        assert torch.equal(got, attention.hard_assign(w, c))
        monkeypatch.undo()
        assert calls == ([1] if k > 1 else [])


def test_the_triton_kernel_floors_logits_where_attention_does():
    source = (Path(attention.__file__).parent / "fused_triton.py").read_text()
    assert f"EXP_FLOOR = {attention.EXP_FLOOR}" in source


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_sees_nan_and_inf_anywhere(dtype):
    """The finite check that k-means and the checkpoint guard run on whole weights (no temporaries of their size)."""
    from dkm_hf.ops.attention import all_finite

    w = torch.randn(3, 1000).to(dtype)
    assert all_finite(w).dtype == torch.bool and bool(all_finite(w))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (1, 517), (2, 999)):
            v = w.clone()
            v[where] = bad
            assert not bool(all_finite(v)), (bad, where)
    assert bool(all_finite(torch.empty(0))) and bool(all_finite(torch.arange(5)))


# Behaviours of dkm_hf/ops/attention.py no other test pinned (a mutation review)


def test_16_bit_weights_are_assigned_against_float32_centroids():
    """A bf16 weight is assigned against its float32 centroids, not their bf16 rounding, which would merge centroids
    closer than bf16's step (here 1.0 and 1.001: the weight 1.0078125 is nearer to 1.001)."""
    from dkm_hf.ops import attention

    w = torch.tensor([1.0078125, 0.75], dtype=torch.bfloat16).view(1, 2, 1)
    c = torch.tensor([1.0, 1.001, 0.0, 2.0]).view(1, 4, 1)
    expected = attention.hard_assign(w.float(), c)
    assert expected.tolist() == [[1, 0]]
    pieces = list(attention.assign_slices(w, c))
    assert len(pieces) == 1 and torch.equal(pieces[0][2], expected)
    lut = c.clone()
    torch.testing.assert_close(attention.snap(w, c, lut), torch.tensor([1.001, 1.0]).view(1, 2, 1))


def test_16_bit_hard_assign_breaks_ties_as_argmin():
    """16-bit weights break ties as argmin does (the lowest index) when bf16 rounds several centroids to one distance
    (here all three near 1.0, seen from -100), which the sorted binary search would not."""
    from dkm_hf.ops import attention

    c = torch.tensor([1.015625, 1.0078125, 1.0, 5.0], dtype=torch.bfloat16).view(1, 4, 1)
    w = torch.tensor([-100.0, 1.0], dtype=torch.bfloat16).view(1, 2, 1)
    expected = attention.squared_distance(w, c).argmin(1)
    assert expected.tolist() == [[0, 2]]
    assert torch.equal(attention.hard_assign(w, c), expected)
