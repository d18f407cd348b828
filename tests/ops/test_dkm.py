"""The DKM loop: both fast paths against a naive autograd reference, gradients, early stop."""

from __future__ import annotations

import pytest
import torch
from reference import naive_dkm, weights

from dkm_hf.ops import dkm, fused
from dkm_hf.ops.attention import gather_centroids, hard_assign
from dkm_hf.ops.buckets import unique_buckets
from dkm_hf.ops.dkm import dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_gradcheck_chunked_float64():
    w = weights(2, 12, 2, torch.float64).requires_grad_()
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
    _assert_matches_reference(weights(groups, 640, d), bits, 5, "chunked", seed=1)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_uniquified_matches_naive_reference(groups, bits):
    w = weights(groups, 3000, 1)  # float16-representable, with many repeated values
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
    w = weights(2, 500, 2)
    c = kmeans_init(w, 8, seed=0)
    soft, c_final = dkm_cluster(w, c, 1e-9, 1, 0.0, "chunked")
    hard = gather_centroids(hard_assign(w, c), c_final)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)


def test_early_stop_at_epsilon():
    w = weights(1, 400, 1)
    c = kmeans_init(w, 4, seed=0)
    _, c_one = dkm_cluster(w, c, 1e-3, 1, 0.0, "chunked")
    _, c_many = dkm_cluster(w, c, 1e-3, 50, 1e9, "chunked")  # huge epsilon: stops after the first iteration
    assert torch.equal(c_one, c_many)


@pytest.mark.parametrize("implementation", ["chunked", "uniquified"])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3, 1e9])
def test_device_loop_without_host_synchronisation_matches_the_host_loop(monkeypatch, implementation, epsilon):
    """On accelerators all max_iters iterations run and T is picked on the device; values, final centroids and
    gradients equal the host loop's, which stops early (checked here on the CPU by forcing the device path)."""
    w = weights(2, 3000, 1)
    c0 = kmeans_init(w, 8, seed=0)
    grad = torch.randn_like(w)
    results = []
    for host in (True, False):
        monkeypatch.setattr(dkm, "HOST_EARLY_STOP", ("cpu",) if host else ())
        x = w.clone().requires_grad_()
        y, c = dkm_cluster(x, c0, 1e-3, 5, epsilon, implementation)
        (y * grad).sum().backward()
        results.append((y.detach(), c, x.grad))
    for host, device in zip(results[0], results[1]):
        torch.testing.assert_close(device, host, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("implementation", ["chunked", "uniquified"])
@pytest.mark.parametrize(
    ("epsilon", "iterations"), [([1e9, 1e9, 1e9], 1), ([1e9, 1e-30, 1e9], 5), ([1e-30, 1e9, 1e9], 5)]
)
def test_per_group_tau_and_epsilon_match_the_reference_group_by_group(implementation, epsilon, iterations):
    """tau and epsilon given per LUT group act as each group's own: every group equals a reference run with its
    scalar tau (the early stop looks at every group's centroid move against its own epsilon, and the loop runs
    until every group has converged: one group that has not keeps all iterating)."""
    w = weights(3, 2000, 1)
    c0 = kmeans_init(w, 8, seed=0)
    tau = torch.tensor([1e-3, 4e-3, 2e-4])
    y, c = dkm_cluster(w, c0, tau, 5, torch.tensor(epsilon), implementation)
    for g in range(3):
        y_ref, c_ref = naive_dkm(w[g : g + 1], c0[g : g + 1], float(tau[g]), iterations, 0.0)
        assert _rel(y[g : g + 1], y_ref) < 1e-5 and _rel(c[g : g + 1], c_ref) < 1e-5


@pytest.mark.parametrize("implementation", ["chunked", "uniquified"])
def test_the_attention_cache_changes_nothing(monkeypatch, implementation):
    w = weights(2, 3000, 1)
    c0 = kmeans_init(w, 16, seed=0)
    grad = torch.randn_like(w)
    results, calls = [], []
    counted = dkm.attention

    def attention(*args):
        calls[-1] += 1
        return counted(*args)

    monkeypatch.setattr(dkm, "attention", attention)
    monkeypatch.setattr(fused, "cpu_kernels", lambda: None)  # the uniquified loop in torch, where the cache is
    for budget in (1 << 30, 0):
        monkeypatch.setattr(dkm, "ATTENTION_CACHE_BYTES", budget)
        calls.append(0)
        x = w.clone().requires_grad_()
        y, c = dkm_cluster(x, c0, 1e-3, 3, 0.0, implementation)
        (y * grad).sum().backward()
        results.append((y.detach(), c, x.grad))
    for cached, recomputed in zip(*results):
        assert torch.equal(cached, recomputed)
    assert 0 < calls[0] < calls[1]  # the cache saved attention evaluations


def _importance(w: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """Sample weights (G, n) spread over four orders of magnitude, as squared gradients are."""
    g = torch.Generator().manual_seed(seed)
    return 10 ** (4 * torch.rand(w.shape[:2], generator=g, dtype=torch.float64) - 2)


@pytest.mark.parametrize("d", [1, 2])
def test_importance_weighted_loop_gradcheck_and_reference(d):
    """The importance-weighted loop, C = A^T (f w) / A^T f: exact gradients (gradcheck, float64) and the naive
    autograd reference's values, centroids and gradients over 1 and 3 iterations."""
    w = weights(3, 16, d, torch.float64)
    f = _importance(w)
    c0 = kmeans_init(w.float(), 4, seed=0).double()
    torch.autograd.gradcheck(
        lambda x: dkm_cluster(x, c0, 5e-3, 3, 0.0, "chunked", importance=f)[0],
        (w.clone().requires_grad_(),), eps=1e-6, atol=1e-6,
    )  # fmt: skip
    grad = torch.randn_like(w)
    for iters in (1, 3):
        fast, ref = w.clone().requires_grad_(), w.clone().requires_grad_()
        y, c = dkm_cluster(fast, c0, 5e-3, iters, 0.0, "chunked", importance=f)
        y_ref, c_ref = naive_dkm(ref, c0, 5e-3, iters, 0.0, importance=f)
        (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
        for a, b in ((y, y_ref), (c, c_ref), (fast.grad, ref.grad)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_importance_of_ones_is_the_plain_loop_and_every_implementation_runs_it_chunked(monkeypatch):
    """f = 1 gives the plain loop to the bit (the same sums with factors of one); with importance and no fused kernel
    every implementation runs the chunked loop (tests/ops/test_fused.py checks the kernel's weighted loop); the
    device loop (no host early stop) gives the host loop's results."""
    w = weights(2, 3000, 1)
    c0 = kmeans_init(w, 8, seed=0)
    grad = torch.randn_like(w)

    def run(implementation, importance):
        x = w.clone().requires_grad_()
        y, c = dkm_cluster(x, c0, 1e-3, 3, 1e-4, implementation, importance=importance)
        (y * grad).sum().backward()
        return y.detach(), c, x.grad

    for a, b in zip(run("chunked", torch.ones(2, 3000)), run("chunked", None)):
        assert torch.equal(a, b)
    f = _importance(w).float()
    weighted = run("chunked", f)
    monkeypatch.setattr(fused, "available", lambda w: False)
    assert not torch.equal(weighted[1], run("chunked", None)[1])
    for implementation in ("auto", "fused", "uniquified"):
        for a, b in zip(run(implementation, f), weighted):
            assert torch.equal(a, b), implementation
    # a 16-bit weight loops in float32 (its values are float16-representable here): the same results, its gradient cast
    x16 = w.half().requires_grad_()
    y16, c16 = dkm_cluster(x16, c0, 1e-3, 3, 1e-4, "fused", importance=f)
    (y16 * grad).sum().backward()
    assert y16.dtype == torch.float32 and x16.grad.dtype == torch.float16
    assert torch.equal(y16.detach(), weighted[0]) and torch.equal(c16, weighted[1])
    assert torch.equal(x16.grad, weighted[2].half())
    monkeypatch.setattr(dkm, "HOST_EARLY_STOP", ())
    for a, b in zip(run("chunked", f), weighted):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="importance of shape"):
        dkm_cluster(w, c0, 1e-3, 1, 0.0, importance=torch.ones(2, 10))


@pytest.mark.parametrize("std", [1e-2, 1e-5, 1e-6])
def test_uniquified_keys_float32_weights_relative_to_their_magnitude(std):
    """float32 weights were keyed by their float16 rounding as they are: below 2**-14 float16 is subnormal, and a
    layer of weights ~1e-6 fell into a few buckets (gradient 61% off the exact path, 6% at 1e-5). Each group is now
    keyed at a power-of-two scale: the errors are those of normal weights, at any magnitude."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2, 50_000, 1, generator=g) * std * torch.tensor([1.0, 3.0]).view(2, 1, 1)).requires_grad_(True)
    c0 = torch.sort(torch.randn(2, 16, 1, generator=g) * std, dim=1).values
    tau, epsilon = 0.01 * w.detach().var(dim=(1, 2)), 1e-4 * w.detach().std(dim=(1, 2))
    upstream = torch.randn(w.shape, generator=g)
    results = {}
    for implementation in ("chunked", "uniquified"):
        weight = w.detach().clone().requires_grad_(True)
        soft, centroids = dkm_cluster(weight, c0, tau, 3, epsilon, implementation)
        (soft * upstream).sum().backward()
        results[implementation] = (soft.detach(), centroids, weight.grad)
    (soft_e, c_e, g_e), (soft_u, c_u, g_u) = results["chunked"], results["uniquified"]
    assert ((soft_u - soft_e).norm() / soft_e.norm()).item() < 2e-3
    assert ((g_u - g_e).norm() / g_e.norm()).item() < 0.04
    assert ((c_u - c_e).abs().max() / c_e.abs().max()).item() < 2e-3


@pytest.mark.parametrize("epsilon", [1e-3, 3e-3, 1e-2])
def test_uniquified_early_stop_is_the_chunked_one(epsilon):
    """The uniquified path keys float32 weights at a power-of-two scale: tau and epsilon follow that scale, so the
    loop stops at the iteration the chunked path stops at (an epsilon left unscaled stopped it elsewhere)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 20000, 1, generator=g) * 0.02
    c0 = kmeans_init(w, 16, seed=0) * 1.05  # off the optimum: the loop moves them
    tau = 0.05 * w.var().item()

    def stop(implementation):
        _, c = dkm_cluster(w, c0, tau, 10, epsilon, implementation)
        runs = [dkm_cluster(w, c0, tau, t, 0.0, implementation)[1] for t in range(1, 11)]
        return [t for t, c_t in enumerate(runs, 1) if torch.equal(c_t, c)][0]

    assert stop("uniquified") == stop("chunked") < 10


@pytest.mark.parametrize("implementation", ["chunked", "uniquified"])
def test_each_group_stops_against_its_own_epsilon(implementation):
    """Groups 0 and 2 (weights 64 times larger) converge at once against their epsilons, group 1 at its third
    iteration: the loop stops there for all of them. Against one epsilon for all (group 1's), groups 0 and 2 would
    keep moving more than it and the loop would run on."""
    w = weights(3, 2000, 1)
    scale = torch.tensor([64.0, 1.0, 64.0]).view(3, 1, 1)
    w, c0 = w * scale, kmeans_init(w, 8, seed=0) * scale
    tau = torch.tensor([1e-3, 4e-3, 2e-4]) * scale.view(3) ** 2

    def moves(g):  # the largest centroid move of each iteration of group g, by the reference
        cs = [c0[g : g + 1]] + [naive_dkm(w[g : g + 1], c0[g : g + 1], float(tau[g]), t, 0.0)[1] for t in range(1, 6)]
        return [(b - a).abs().max().item() for a, b in zip(cs, cs[1:])]

    m0, m1, m2 = moves(0), moves(1), moves(2)
    eps1 = (m1[1] + m1[2]) / 2  # above its third move, below its second
    assert m1[2] < eps1 < m1[1] and min(m0[2], m2[2]) > eps1  # with eps1 for all, groups 0 and 2 run on
    epsilon = torch.tensor([max(m0), eps1, max(m2)])
    y, c = dkm_cluster(w, c0, tau, 5, epsilon, implementation)
    for g in range(3):
        y_ref, c_ref = naive_dkm(w[g : g + 1], c0[g : g + 1], float(tau[g]), 3, 0.0)
        assert _rel(y[g : g + 1], y_ref) < 1e-5 and _rel(c[g : g + 1], c_ref) < 1e-5
