"""The fused DKM kernels against the chunked torch path (their reference), on CPU and in Triton's interpreter.

Tolerances. The fused kernels and the reference compute the same float32 expressions in a different summation
order (per-lane partial sums over tiles and chunks of 2,048 vectors against torch's vectorised reductions) with a
different exp (a polynomial 2^x, relative error < 2.5e-7, against torch's ~1 ulp). Neither order is the exact result:
the float32 error of a sum of n terms grows with n (up to ~n * 6e-8 relative, ~sqrt(n) * 6e-8 in practice) and the
DKM iterations propagate it. So the reference is run in float64 as the ground truth, and the fused kernel's error
must stay within a small factor of the float32 reference's own error (with a floor of a few float32 ulps for cases
where that error happens to be tiny): the fused kernel is as accurate as the path it replaces.
"""

from __future__ import annotations

import platform
import warnings

import pytest
import torch
from accuracy import FACTOR, FLOOR, assert_as_accurate_as_reference, importance_of, rel, run, settings
from reference import weights

from dkm_hf.ops import dkm, fused
from dkm_hf.ops.dkm import choose_implementation, dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init

pytestmark = pytest.mark.skipif(fused.cpu_kernels() is None, reason="the fused CPU kernel could not be built")

LAYOUTS = {  # (groups, vectors per group): per-tensor, grouped, per-row (n not a multiple of any vector width)
    "per_tensor": (1, 3001),
    "grouped": (4, 700),
    "per_row": (96, 37),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", range(1, 9))
def test_fused_matches_reference_over_bits_and_layouts(layout, bits):
    groups, n = LAYOUTS[layout]
    assert_as_accurate_as_reference(weights(groups, n, 1, seed=bits), bits, 3)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("layout", ["grouped", "per_row"])
def test_fused_matches_reference_for_vectors(layout, d):
    groups, n = LAYOUTS[layout]
    assert_as_accurate_as_reference(weights(groups, n, d), 3, 3)


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_fused_importance_weighted_loop_matches_reference(layout, bits, d):
    """The importance-weighted loop (C = A^T (f w) / A^T f, f over four orders of magnitude) in the fused kernel:
    values, centroids and gradients as accurate as the chunked float32 path against its float64 result."""
    groups, n = LAYOUTS[layout]
    assert_as_accurate_as_reference(weights(groups, n, d, seed=bits), bits, 3, epsilon_scale=0.0, weighted=True)


def test_fused_importance_of_ones_is_the_plain_kernel():
    """f = 1 multiplies every weighted term by one: the plain kernel's results to the bit (so the weighting is the
    only difference), and a real importance changes them; 16-bit weights take the same float32 loop."""
    w = weights(6, 500, 1)
    c0 = kmeans_init(w, 16, seed=0) * 1.3
    grad = torch.randn_like(w)
    plain = run(w, c0, 1e-3, 0.0, 3, "fused", grad)
    for a, b in zip(run(w, c0, 1e-3, 0.0, 3, "fused", grad, torch.ones(6, 500)), plain):
        assert torch.equal(a, b)
    f = importance_of(w).float()
    weighted = run(w, c0, 1e-3, 0.0, 3, "auto", grad, f)
    assert not torch.equal(weighted[1], plain[1])
    for a, b in zip(run(w, c0, 1e-3, 0.0, 3, "uniquified", grad, f), weighted):  # no buckets for weighted loops
        assert torch.equal(a, b)
    wb, gb = w.bfloat16(), grad.bfloat16()
    got = run(wb, c0, 1e-3, 0.0, 3, "fused", gb, f)
    assert got[0].dtype == got[2].dtype == torch.bfloat16
    ref = run(wb.float(), c0, 1e-3, 0.0, 3, "fused", gb.float(), f)
    assert torch.equal(got[0], ref[0].bfloat16()) and torch.equal(got[2], ref[2].bfloat16())
    tau, eps = torch.full((6,), 1e-3), torch.zeros(6)
    torch.library.opcheck(fused.fused_dkm, (w.clone().requires_grad_(), c0, tau, eps, 2, f))
    with pytest.raises(RuntimeError, match="importance must be a contiguous float32"):
        fused.fused_dkm(w, c0, tau, eps, 2, f[:, :10].contiguous())


@pytest.mark.parametrize("n", [700, 3001])  # groups of one work item (one pass per iteration) and of several
@pytest.mark.parametrize("epsilon_scale", [0.0, 300.0, 1e9])
@pytest.mark.parametrize("tau_scale", ["variance", "absolute"])
def test_fused_early_stop_matches_reference(epsilon_scale, tau_scale, n):
    """No early stop, a stop after a few iterations (per-group epsilon with tau_scale="variance"), a stop after the
    first one; from centroids far from converged."""
    w = weights(4, n, 1)
    assert_as_accurate_as_reference(w, 4, 6, epsilon_scale, tau_scale, c0_scale=1.5)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("tau_ratio", [1e-4, 1e-8])
@pytest.mark.parametrize("layout", ["grouped", "per_row"])
def test_fused_gradients_stay_accurate_at_a_small_tau(layout, tau_ratio, iters):
    """At a small tau each weight's attention is its nearest centroid's, exactly 1, and the rest vanish against it:
    the softmax backward's (g - mean g) a is then zero for the nearest. The kernel's exponential gives 1 there
    exactly, as torch's does (an exponential of 1 + 2^-23 left an ulp of residue, times 2 / tau: gradients 4x their
    own norm off at tau = 1e-8 of the variance, where the reference's error is 7e-8). In between (1e-6) both paths
    lose digits as 1 / tau (errors 1e-5 to 1e-4, the kernel's up to 6x the reference's in one case of four)."""
    groups, n = LAYOUTS[layout]
    assert_as_accurate_as_reference(weights(groups, n, 1), 4, iters, epsilon_scale=0.0, tau_ratio=tau_ratio)
    assert_as_accurate_as_reference(weights(groups, n, 1), 3, iters, 0.0, weighted=True, tau_ratio=tau_ratio)


@pytest.mark.parametrize("n", [700, 3001])
@pytest.mark.parametrize("epsilon_scale", [100.0, 300.0])
def test_fused_stops_at_the_same_iteration_as_the_reference(epsilon_scale, n):
    w = weights(4, n, 1)
    c0 = kmeans_init(w, 16, seed=0) * 1.5  # far from converged: centroids move for a few iterations
    tau, epsilon = settings(w, "variance")
    tau, epsilon = tau.float(), epsilon.float() * epsilon_scale
    *_, T = fused.fused_dkm(w, c0, fused.per_group(tau, 4, w.device), fused.per_group(epsilon, 4, w.device), 6)
    history, _, T_ref, _ = dkm._iterate(w, c0, tau.view(-1, 1, 1), 6, epsilon.view(-1, 1, 1))
    assert 1 < T_ref < 6 and int(T) == T_ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_16_bit_weights_run_the_loop_in_float32(dtype):
    """Like the modules (which cluster float32 copies), the fused path runs in float32 and returns w's dtype: the
    float32 reference's soft weight rounded to the dtype, and the gradient of that rounding."""
    w = weights(8, 300, 1).to(dtype)
    c0 = kmeans_init(w.float(), 16, seed=0)
    tau, epsilon = (x.float() for x in settings(w.float(), "variance"))
    grad = torch.randn(w.shape).to(dtype)
    ref = run(w.float(), c0, tau, epsilon, 3, "chunked", grad.float())
    got = run(w, c0, tau, epsilon, 3, "fused", grad)
    assert got[0].dtype == got[2].dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0], ref[0].to(dtype), rtol=eps, atol=0)
    torch.testing.assert_close(got[1].float(), ref[1], rtol=eps, atol=0)
    assert rel(got[2], ref[2]) < eps


def test_a_16_bit_weight_is_saved_as_itself():
    """Backward needs w: the op keeps the bf16 weight itself (a view of the parameter), not a float32 copy, which would
    hold 2 bytes more per clustered weight from forward to backward (4 GB on a 1B model); opcheck with bf16 too."""
    w = weights(4, 300, 1).bfloat16().requires_grad_()
    c0 = kmeans_init(w.detach().float(), 16, seed=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = dkm_cluster(w, c0, 1e-3, 1, 0.0, "fused")
    big = [t for t in saved if t.numel() >= w.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == w.data_ptr()
    out.float().square().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and w.grad.abs().sum() > 0
    tau, eps = torch.full((4,), 1e-3), torch.zeros(4)
    torch.library.opcheck(fused.fused_dkm, (w.detach().clone().requires_grad_(), c0, tau, eps, 2))


@pytest.mark.parametrize("shape", [(3, 5000), (40, 700)])  # several work items per group; one per group
def test_fused_result_does_not_depend_on_the_thread_count(shape):
    w = weights(*shape, 1)
    c0 = kmeans_init(w, 16, seed=0)
    grad = torch.randn_like(w)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(w, c0, 1e-3, 0.0, 3, "fused", grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [2047, 2048, 2049, 4096])
def test_fused_at_the_work_item_boundary(n):
    """Groups of up to 2,048 vectors take one pass per iteration, larger ones two (sums, then the soft weight): both
    sides of the boundary as accurate as the reference, one iteration (the LLM recipe's) and several."""
    w = weights(2, n, 1, seed=n)
    assert_as_accurate_as_reference(w, 4, 1, epsilon_scale=0.0)
    assert_as_accurate_as_reference(w, 4, 3, epsilon_scale=0.0, weighted=True)


def test_auto_and_fused_choose_a_kernel_only_where_one_serves():
    w = torch.zeros(2, 10, 1)
    assert choose_implementation("auto", w) == "fused"
    assert choose_implementation("fused", w) == "fused"
    assert choose_implementation("chunked", w) == "chunked"
    assert choose_implementation("fused", w.double()) == "chunked"
    assert choose_implementation("auto", torch.zeros(1, 10_000, 1, dtype=torch.float64)) == "uniquified"
    assert choose_implementation("auto", torch.zeros(1, 10_000, 1)) == "fused"
    assert choose_implementation("auto", torch.zeros(1, dkm.UNIQUIFY_MIN_WEIGHTS_FUSED, 1)) == "uniquified"
    assert choose_implementation("auto", torch.zeros(1, 10_000, 2)) == "fused"
    # an importance-weighted loop has no uniquified path: the kernel, or chunked where asked for or none serves
    big = torch.zeros(1, dkm.UNIQUIFY_MIN_WEIGHTS_FUSED, 1)
    assert [
        choose_implementation(name, big, weighted=True) for name in ("auto", "uniquified", "fused", "chunked")
    ] == ["fused", "fused", "fused", "chunked"]
    assert choose_implementation("uniquified", big.double(), weighted=True) == "chunked"
    with pytest.raises(ValueError, match="'fast'"):
        choose_implementation("fast", w)


def test_fused_ops_pass_opcheck_and_compile():
    """Schema, fake (meta) implementations and the autograd registration, as torch.compile and FSDP2 use them."""
    w = weights(3, 100, 1)
    c0 = kmeans_init(w, 8, seed=0)
    tau, eps = torch.full((3,), 1e-3), torch.zeros(3)
    torch.library.opcheck(fused.fused_dkm, (w.clone().requires_grad_(), c0, tau, eps, 3))
    compiled = torch.compile(lambda x: fused.dkm(x, c0, 1e-3, 3, 0.0)[0], backend="aot_eager", fullgraph=True)
    x, y = w.clone().requires_grad_(), w.clone().requires_grad_()
    compiled(x).square().sum().backward()
    fused.dkm(y, c0, 1e-3, 3, 0.0)[0].square().sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_a_failed_build_warns_once_and_keeps_the_torch_path(tmp_path, monkeypatch):
    w = weights(2, 300, 1)
    c0 = kmeans_init(w, 4, seed=0)  # before the build breaks: its Lloyd loop would be the first to ask for it
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this kernel does not compile\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setattr(fused, "build_dir", lambda: tmp_path / "build")
    monkeypatch.setattr(fused, "_CPU", None)
    monkeypatch.setattr(fused, "_CPU_TRIED", False)
    reason = r"\(broken.cpp\) could not be built.*error: #error this kernel does not compile"
    with pytest.warns(RuntimeWarning, match=reason):
        y, c = dkm_cluster(w, c0, 1e-3, 3, 0.0, "fused")
    ref = dkm_cluster(w, c0, 1e-3, 3, 0.0, "chunked")
    assert torch.equal(y, ref[0]) and torch.equal(c, ref[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_implementation("auto", w) == "chunked"


def test_a_compiler_without_openmp_builds_the_kernel_serial(tmp_path, monkeypatch):
    """Apple's clang has no -fopenmp: the kernel is built again without it, in a folder of its own, with a warning
    (before: the torch path)."""
    import types

    calls = []

    def build_and_load(directory, name, sources, flags, ldflags, module):
        calls.append((directory.name, name, "-fopenmp" in flags, ldflags))
        if "-fopenmp" in flags:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return types.SimpleNamespace(abi_version=lambda: fused.ABI_VERSION)

    monkeypatch.setattr(fused, "build_and_load", build_and_load)
    monkeypatch.setattr(fused, "build_dir", lambda: tmp_path / "fused-x")
    monkeypatch.setattr(fused, "_CPU", None)
    monkeypatch.setattr(fused, "_CPU_TRIED", False)
    with pytest.warns(RuntimeWarning, match=r"built without OpenMP \(slower\): .*unsupported option '-fopenmp'"):
        kernels = fused.cpu_kernels()
    assert kernels is not None and fused.cpu_kernels() is kernels
    serial = ("fused-x-serial", "dkm_hf_fused_serial", False, [])  # (torch names a second build of one name `_v1`)
    assert calls == [("fused-x", "dkm_hf_fused", True, ["-fopenmp"]), serial]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86's flush-to-zero mode")
@pytest.mark.parametrize("n", [700, 3001])  # one pass per iteration, two passes
def test_the_kernels_flush_denormals_and_restore_the_callers_mode(n):
    """Inside the passes, numbers below float32's normal range count as zero (on Intel cores each one costs a
    microcode assist otherwise: a per-row SmolLM2 layer 10x slower): weights of 1e-39 cluster as zeros, and their
    soft weight and gradient those of zeros. The caller's mode is restored: a denormal times one is still itself."""
    tiny = torch.tensor([1e-39])
    c0 = torch.tensor([0.0, 1e-39, 2e-39, 3e-39]).view(1, 4, 1).expand(3, 4, 1).contiguous()
    results = []
    for value in (1e-39, 0.0):
        w = torch.full((3, n, 1), value).requires_grad_()
        y, c = fused.dkm(w, c0, 1e-3, 2, 0.0)
        y.sum().backward()
        results.append((y.detach(), c, w.grad))
    assert torch.count_nonzero(results[0][0]) == torch.count_nonzero(results[0][1]) == 0
    for flushed, zeros in zip(*results):
        assert torch.equal(flushed, zeros)
    assert (tiny * 1.0).item() == tiny.item() != 0


@pytest.mark.parametrize("shape", [(7, 1, 1), (300, 577, 1), (5, 2048, 1), (30, 50, 3)])
def test_group_variance_kernel_matches_float64(shape):
    """The relative tau's scale from the compiled kernel (layout.group_variance on float32 CPU vectors): the mean
    squared distance to each group's mean vector, as accurate as the torch expression it replaces, far from zero mean
    too; the torch expression still serves tensors that need a gradient."""
    from dkm_hf.nn.layout import group_variance

    v = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.5
    truth = (v.double() - v.double().mean(1, keepdim=True)).square().sum((1, 2)) / shape[1]
    got = group_variance(v)
    torch_path = torch.linalg.vector_norm(v - v.mean(1, keepdim=True), dim=(1, 2)).square() / shape[1]
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    err, err_torch = rel(got, truth), rel(torch_path, truth)
    assert err <= FACTOR * err_torch + FLOOR, f"kernel {err:.3g}, torch {err_torch:.3g}"
    with_grad = group_variance(v.clone().requires_grad_())
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), torch_path)
    torch.library.opcheck(fused.group_variance, (v,))


def test_group_variance_kernel_of_millions_of_values_is_float64_exact():
    """One float sum per SIMD lane over a whole group stopped growing: an 8B model's embedding (5e8 values) came out
    8% low, 4M values 7e-5 low (this test's size); the lanes are flushed into double every 4096 values."""
    v = torch.randn(1, 1 << 22, 1, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.01
    truth = v.double().var(dim=1, unbiased=False).view(1)
    assert rel(fused.group_variance(v), truth) < 1e-6


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize(
    ("bits", "iters", "eps_scale"), [(1, 3, 0.0), (4, 1, 0.0), (4, 3, 0.0), (4, 6, 300.0), (8, 1, 0.0)]
)
def test_uniquified_loop_in_the_kernel_is_as_accurate_as_the_torch_loop(monkeypatch, groups, bits, iters, eps_scale):
    """On CPU the uniquified path runs its loop over the buckets (the counts as importance) and its backward (each
    bucket's shared term and soft-weight derivative, `backward_buckets`) in the kernel: as accurate as its torch loop,
    both measured from that loop in float64, over one and several iterations, an early stop and 1-8 bits."""
    w = (torch.randn(groups, 40_000, 1, generator=torch.Generator().manual_seed(bits)) * 0.02).half().float()
    c0 = kmeans_init(w, 2**bits, seed=0)
    tau, epsilon = settings(w, "variance")
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    truth = run(w.double(), c0.double(), tau, epsilon * eps_scale, iters, "uniquified", grad.double())
    args = (w, c0, tau.float(), (epsilon * eps_scale).float(), iters, "uniquified", grad)
    got = run(*args)
    monkeypatch.setattr(fused, "cpu_kernels", lambda: None)  # the torch loop (and torch's bucket maps)
    ref = run(*args)
    assert not torch.equal(got[2], ref[2])  # two loops (another order of the sums), not one
    for name, a, b, t in zip(("soft weight", "centroids", "gradient"), got, ref, truth):
        err_got, err_ref = rel(a, t), rel(b, t)
        assert err_got <= FACTOR * err_ref + FLOOR, f"{name}: kernel {err_got:.3g}, torch loop {err_ref:.3g}"


def test_the_cuda_kernels_inputs_are_checked_as_the_cpu_kernels_are():
    """The CUDA registration of torch.ops.dkm_hf.fused_dkm checked nothing: a tau with fewer values than groups
    made the Triton kernel read past its end."""
    from dkm_hf.ops import fused as fused_ops

    w, c0 = torch.randn(3, 10, 1), torch.randn(3, 4, 1)
    fused_ops._check_cuda_inputs(w, c0, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="tau has 1 values for 3 groups"):
        fused_ops._check_cuda_inputs(w, c0, torch.ones(1), torch.ones(3))
    with pytest.raises(ValueError, match=r"w \(3, 10, 1\) and c0 \(2, 4, 1\)"):
        fused_ops._check_cuda_inputs(w, c0[:2], torch.ones(3), torch.ones(3))


def test_the_kernels_refuse_inputs_their_loops_would_read_past_or_leave_unwritten():
    """The operators are public (torch.ops.dkm_hf) and the compiled module's functions callable: masses of the wrong
    shape were read as (T, G, k) past their end (a crash), a group of no vectors left its centroids uninitialised, a
    huge max_iters over empty groups ran one copy per iteration (a hang), out-of-range k-means bounds and no centroids
    at all read outside their tensors, and one meta tensor among CPU ones returned uninitialised CPU results."""
    kernels = fused.cpu_kernels()
    G, n, k = 2, 40, 8
    w, c0 = torch.randn(G, n, 1), torch.randn(G, k, 1)
    tau, eps = torch.full((G,), 0.1), torch.full((G,), 1e-6)
    _, _, history, masses, T = torch.ops.dkm_hf.fused_dkm(w, c0, tau, eps, 5)
    grad = torch.ones_like(w)
    for bad in (masses[:, 0, 0].contiguous(), masses[:, :1].contiguous(), masses.reshape(-1, G * k, 1)):
        with pytest.raises(RuntimeError, match="masses .* do not match the history"):
            torch.ops.dkm_hf.fused_dkm_backward(w, grad, history, bad, T, tau)
    with pytest.raises(RuntimeError, match="T must be one integer"):
        torch.ops.dkm_hf.fused_dkm_backward(w, grad, history, masses, T.double(), tau)
    with pytest.raises(RuntimeError, match="groups of no vectors"):
        torch.ops.dkm_hf.fused_dkm(w[:, :0], c0, tau, eps, 1)
    empty = torch.ops.dkm_hf.fused_dkm(w[:0], c0[:0], tau[:0], eps[:0], 10**7)  # one copy, not 10**7 of them
    assert empty[2].shape == (10**7 + 1, 0, k, 1)
    with pytest.raises(RuntimeError, match=r"max_iters must be in \[1, 2\*\*24\]"):
        torch.ops.dkm_hf.fused_dkm(w, c0, tau, eps, 2**62)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.dkm_hf.fused_dkm(w, c0.to("meta"), tau, eps, 1)
    x = torch.sort(torch.randn(1, 10, dtype=torch.float64)).values
    s1 = torch.cat([torch.zeros(1, 1, dtype=torch.float64), x.cumsum(1)], 1)
    c = torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64)
    for bounds in ([0, 5, 13], [-1, 5, 10]):
        with pytest.raises(RuntimeError, match=r"bounds must lie in \[0, 10\]"):
            kernels.lloyd_sorted(x, s1, c, torch.tensor([[bounds]]), 2)
    with pytest.raises(RuntimeError, match="no centroids"):
        kernels.nearest_sorted(torch.randn(1, 5), torch.empty(1, 0), torch.empty(1, 0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="CPU table"):
        kernels.bucket_gather(torch.empty(65536, device="meta"), torch.zeros(4, dtype=torch.int16))
