"""k-means++ / Lloyd initialisation of the centroids."""

from __future__ import annotations

import pytest
import torch
from reference import naive_kmeans_1d, weights

from dkm_hf.ops import kmeans
from dkm_hf.ops.attention import gather_centroids, hard_assign
from dkm_hf.ops.kmeans import kmeans_init, kmeans_init_many


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


def _inertia(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-group sum of squared distances to the nearest centroid, (G,)."""
    return (w - gather_centroids(hard_assign(w, c), c)).square().sum((1, 2))


def test_best_of_keeps_each_groups_lowest_inertia_run():
    """`_best_of` runs every group `restarts` times as extra groups and keeps, per group, the copy of least inertia."""
    from dkm_hf.ops.kmeans import _best_of

    x = torch.zeros(3, 4)
    inertia = torch.tensor([5.0, 1.0, 7.0, 2.0, 9.0, 0.5, 3.0, 4.0, 6.0])  # copies 0..2 of groups 0..2, copy-major
    centroids = torch.arange(9.0).view(9, 1)  # centroid value = row index in the batched call

    def run(xb, wb):
        assert xb.shape == (9, 4) and wb.shape == (9, 4)
        return centroids, inertia

    picked = _best_of(run, x, torch.ones(3, 4), restarts=3, per_batch=3)
    # group 0: copies 5 / 2 / 3 -> copy 1 (row 3); group 1: 1 / 9 / 4 -> copy 0 (row 1); group 2: 7 / 0.5 / 6 -> row 5
    assert picked.view(-1).tolist() == [3.0, 1.0, 5.0]


def test_restarts_avoid_poor_local_optima():
    """Over many heavy-tailed groups (per-row LUTs), the best of 4 runs never has more inertia than a single run's
    worst case and is lower in total; a single run leaves some groups well above the best inertia found."""
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((400, 256, 1)) * 0.02
    w = w + 0.01 * torch.randn(400, 256, 1, generator=g)
    single = torch.stack([_inertia(w, kmeans_init(w, 8, seed=s, restarts=1)) for s in range(4)])
    best = _inertia(w, kmeans_init(w, 8, seed=0, restarts=4))
    floor = torch.minimum(single.min(0).values, best)
    assert (single[0] / floor).max() > 1.1  # one seed alone lands in a bad optimum for some group
    assert (best / floor).max() < (single[0] / floor).max()
    assert best.sum() < single.mean(0).sum()
    for d in (1, 2):  # the d > 1 path keeps the best run too
        v = w.view(400, -1, d)[:50]
        assert (
            _inertia(v, kmeans_init(v, 4, seed=0, restarts=4)).sum()
            <= _inertia(v, kmeans_init(v, 4, seed=0, restarts=1)).sum() * 1.0001
        )


def _heavy_tailed(groups: int, n: int, seed: int = 0) -> torch.Tensor:
    """Per-row weights as an LLM has them: heavy tails, bfloat16 values (many exact duplicates), float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((groups, n, 1)) * 0.02
    return (w + 0.01 * torch.randn(groups, n, 1, generator=g)).to(torch.bfloat16).float()


def test_sorted_kmeans_is_the_dense_definition():
    """The prefix-sum k-means++ draws and Lloyd iterations on sorted values give what the dense definition gives for
    the same uniform numbers (up to exact ties between bfloat16 duplicates): as good, group for group."""
    torch.manual_seed(0)
    w = _heavy_tailed(300, 256)
    reference = naive_kmeans_1d(w, kmeans._uniform(3, 300, 4, 8, "cpu"))
    fast = kmeans_init(w, 8, seed=3, restarts=4)
    same = torch.isclose(fast.double(), reference, rtol=0, atol=1e-6).all(1).squeeze(-1)
    assert same.float().mean() >= 0.97
    assert _inertia(w, fast).sum() <= _inertia(w, reference.float()).sum() * (1 + 1e-3)


def test_kmeans_init_many_batches_weights_without_changing_them(monkeypatch):
    """Weights batched together (and rows split across batches) get exactly their own `kmeans_init` centroids:
    per-row groups of two lengths, a large per-tensor group (histogram path) and d = 2."""
    many = [
        _heavy_tailed(40, 64, seed=1),
        _heavy_tailed(7, 100, seed=2),
        _heavy_tailed(25, 64, seed=3),
        weights(1, kmeans.HISTOGRAM_FROM + 10, 1),
        weights(3, 50, 2),
    ]
    alone = [kmeans_init(w, 16, seed=5, restarts=3) for w in many]
    monkeypatch.setattr(kmeans, "SORTED_BATCH_CPU", 30 * 64)  # 30 rows of 64 per batch
    batched = kmeans_init_many(many, 16, seed=5, restarts=3)
    assert [c.shape for c in batched] == [(40, 16, 1), (7, 16, 1), (25, 16, 1), (1, 16, 1), (3, 16, 2)]
    for a, b in zip(alone, batched):
        assert torch.equal(a, b)
    assert torch.equal(kmeans_init_many(many[:1], 16, seed=5, restarts=3)[0], batched[0])
    assert not torch.equal(kmeans_init_many(many[:1], 16, seed=6, restarts=3)[0], batched[0])


def test_kmeans_init_many_names_a_bad_weight():
    with pytest.raises(ValueError, match=r"weight 1 has shape \(4, 3\)"):
        kmeans_init_many([torch.zeros(2, 3, 1), torch.zeros(4, 3)], 4)


def test_lloyd_kernel_equals_the_torch_steps(monkeypatch):
    """The C++ Lloyd loop (dkm_kmeans.cpp) gives the torch steps' centroids to the bit: per-row groups with repeated
    values, more centroids than distinct values (empty clusters), runs that stop at different iterations, restarts,
    a capped iteration count; non-finite values keep the torch path."""
    if kmeans.fused.cpu_kernels() is None:
        pytest.skip("the CPU extension is not available")
    g = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [
            torch.randn(40, 300, generator=g) * 0.02,
            torch.randint(-3, 4, (8, 300), generator=g).float() * 0.01,  # 7 distinct values for 16 centroids
            torch.randn(8, 300, generator=g).pow(3),  # heavy tails
        ]
    )
    x = rows.sort(1).values
    u = torch.rand(x.shape[0], 3, 16, generator=g, dtype=torch.float64)
    calls = []
    kernel = kmeans.fused.cpu_kernels()

    class Counting:
        def lloyd_sorted(self, *args):
            calls.append(args[-1])
            return kernel.lloyd_sorted(*args)

    for iters in (50, 2):
        p = kmeans._Prefix(x, None)
        seeded = kmeans._seed_1d(p, u)
        monkeypatch.setattr(kmeans.fused, "cpu_kernels", lambda: Counting())
        fast = kmeans._lloyd_1d(p, *seeded, iters)
        monkeypatch.setattr(kmeans.fused, "cpu_kernels", lambda: None)
        slow = kmeans._lloyd_1d(p, *seeded, iters)
        assert torch.equal(fast, slow) and fast.dtype == torch.float64
        assert not torch.equal(fast, seeded[0])  # the loop moved the centroids
    assert calls == [50, 2]
    # a NaN among the values: the torch path (its searchsorted order), not the kernel
    x[0, -1] = float("nan")
    p = kmeans._Prefix(x, None)
    monkeypatch.setattr(kmeans.fused, "cpu_kernels", lambda: Counting())
    kmeans._lloyd_1d(p, *kmeans._seed_1d(p, u), 5)
    assert calls == [50, 2]


def _weighted_inertia(w: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-group sum of f (w - nearest centroid)^2, (G,)."""
    return (f * (w - gather_centroids(hard_assign(w, c), c)).square()).sum((1, 2))


@pytest.mark.parametrize("n", [500, kmeans.HISTOGRAM_FROM + 7000])  # sorted values; the 16-bit histogram
def test_importance_gives_heavy_values_their_own_centroids(n):
    """Four values per group carry almost all the importance: weighted k-means puts a centroid on each (the light
    values' pull on it is at most their importance over the heavy one's, ~1e-3 of the spread), plain k-means does
    not, and the weighted objective is lower than with the plain centroids."""
    g = torch.Generator().manual_seed(3)
    G = 1 if n > kmeans.HISTOGRAM_FROM else 3
    w = torch.randn(G, n, 1, generator=g).half().float()  # 16-bit values: each its own histogram bucket
    f = torch.full_like(w, 1e-4)
    heavy = torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(G)])
    f.scatter_(1, heavy.unsqueeze(-1), 1e3)
    weighted = kmeans_init(w, 8, seed=1, restarts=2, importance=f)
    plain = kmeans_init(w, 8, seed=1, restarts=2)
    heavy_values = w.gather(1, heavy.unsqueeze(-1))  # (G, 4, 1)
    gap = lambda c: (heavy_values - c.transpose(1, 2)).abs().amin(-1)  # noqa: E731 (G, 4)
    assert gap(weighted).max().item() < 1e-2
    assert gap(plain).max().item() > 5e-2
    assert (_weighted_inertia(w, f, weighted) < _weighted_inertia(w, f, plain)).all()
    assert torch.equal(weighted, kmeans_init(w, 8, seed=1, restarts=2, importance=f))  # deterministic


def test_importance_of_vectors_and_in_a_batch_with_plain_weights():
    """d > 1 counts a vector by the sum of its values' importance; in `kmeans_init_many` a weighted weight gets what
    it gets alone and the unweighted weights beside it what they get without it."""
    g = torch.Generator().manual_seed(4)
    w2 = torch.randn(2, 300, 2, generator=g)
    f2 = torch.full_like(w2, 1e-4)
    f2[:, :5] = 1e3
    c2 = kmeans_init(w2, 8, seed=0, importance=f2)
    assert torch.cdist(w2[:, :5], c2).amin(-1).max().item() < 1e-2
    a, b = weights(6, 64, 1), weights(4, 64, 1)
    fa = torch.rand(a.shape, generator=g)
    many = kmeans_init_many([a, b], 4, seed=2, restarts=2, importance=[fa, None])
    assert torch.equal(many[0], kmeans_init(a, 4, seed=2, restarts=2, importance=fa))
    assert torch.equal(many[1], kmeans_init(b, 4, seed=2, restarts=2))


def test_importance_edge_cases_and_bad_input():
    """A group without importance is clustered unweighted; negative importance counts as none; wrong shapes,
    non-finite values and a wrong count are refused by name."""
    w = weights(2, 200, 1)
    zero = torch.zeros_like(w)
    assert torch.allclose(
        _inertia(w, kmeans_init(w, 4, seed=0, importance=zero)), _inertia(w, kmeans_init(w, 4, seed=0)), rtol=0.05
    )
    c = kmeans_init(w, 4, seed=0, importance=-torch.ones_like(w))
    assert torch.isfinite(c).all()
    with pytest.raises(ValueError, match="importance 0 has shape"):
        kmeans_init(w, 4, importance=torch.ones(2, 100, 1))
    with pytest.raises(ValueError, match="non-finite"):
        kmeans_init(w, 4, importance=torch.full_like(w, float("nan")))
    with pytest.raises(ValueError, match="2 importance tensors for 1 weights"):
        kmeans_init_many([w], 4, importance=[None, None])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_kmeans_itself(bad):
    """kmeans_init's own check (one inf would make every centroid of its group inf), not only the callers'."""
    w = weights(2, 64, 1)
    w[1, 5, 0] = bad
    with pytest.raises(ValueError, match="weight 1 has non-finite values"):
        kmeans_init_many([weights(1, 64, 1), w], 4)
    with pytest.raises(ValueError, match="non-finite"):
        kmeans_init(w.view(2, 32, 2), 4)  # d > 1 too


def test_values_without_importance_keep_a_share_of_the_centroids():
    """`sample_weights`' floor (1e-3 of the group's mean importance) keeps every value in play: two heavy values and
    many values of zero importance, 4 centroids: the two spare centroids go to the light values instead of
    duplicating the heavy ones (without the floor the light values weigh nothing)."""
    g = torch.Generator().manual_seed(0)
    light = torch.rand(1, 200, 1, generator=g) * 0.1 + 1.0  # in [1.0, 1.1]
    w = torch.cat([torch.tensor([-1.0, 0.0]).view(1, 2, 1), light], 1)
    f = torch.zeros_like(w)
    f[:, :2] = 1.0
    assert (kmeans.sample_weights(f[..., 0]) > 0).all()
    c = kmeans_init(w, 4, seed=0, importance=f)[0, :, 0]
    assert c.unique().numel() == 4
    assert ((c > 0.99) & (c < 1.11)).sum() == 2  # two centroids among the light values


def test_weighted_kmeans_of_vectors_reports_the_weighted_inertia():
    """d > 1: the inertia `_best_of` keeps the best restart by is sum f ||x - nearest||^2, the importance-weighted
    objective, not the plain one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 2, generator=g)
    f = torch.rand(3, 50, generator=g) * 10
    c, inertia = kmeans._weighted_kmeans(x, f, 4, torch.Generator().manual_seed(0), 20)
    nearest = gather_centroids(hard_assign(x, c), c)
    expected = (f.double() * (x - nearest).square().sum(-1).double()).sum(1)
    assert torch.allclose(inertia, expected, rtol=1e-6)


def test_fewer_distinct_vectors_than_centroids_invents_no_vector():
    """d > 1 with 3 distinct vectors for 8 centroids: every centroid is one of the vectors (an empty cluster keeps
    its centroid instead of moving to the origin)."""
    data = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]])
    w = data.repeat(10, 1).unsqueeze(0)  # (1, 30, 2)
    c = kmeans_init(w, 8, seed=0)
    assert c.shape == (1, 8, 2)
    distance = torch.cdist(c[0], data).amin(1)
    assert distance.max().item() < 1e-5
