"""The core, module and trainer paths on CUDA, against the same computation on the CPU.

Skipped where no GPU is visible. `bash scripts/cuda_check.sh` runs these plus the CUDA benchmark suites in one go.
"""

from __future__ import annotations

import pytest
import torch
from accuracy import assert_as_accurate_as_reference, rel, run
from conftest import AUTO, PER_ROW_2BIT, U, assert_within, tiny_inputs, tiny_lm_batches
from reference import weights
from torch import nn

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.nn.layout import group_variance
from dkm_hf.ops import dkm as ops_dkm
from dkm_hf.ops import fused
from dkm_hf.ops.buckets import unique_buckets
from dkm_hf.ops.dkm import dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init, kmeans_init_many

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("implementation", ["chunked", "uniquified", "fused"])
@pytest.mark.parametrize("epsilon", [0.0, 1e9])
def test_dkm_loop_matches_the_cpu(implementation, epsilon):
    """Each path on CUDA (fused: the Triton kernel) against the chunked path on the CPU, values and gradients."""
    w = weights(3, 4000, 1)
    c0 = kmeans_init(w, 16, seed=0)
    grad = torch.randn_like(w)
    out = {}
    for device in ("cpu", "cuda"):
        x = w.detach().to(device, copy=True).requires_grad_()
        y, c = dkm_cluster(x, c0.to(device), 1e-3, 3, epsilon, "chunked" if device == "cpu" else implementation)
        (y * grad.to(device)).sum().backward()
        out[device] = (y.detach(), c, x.grad)
    for cpu, cuda in zip(out["cpu"], out["cuda"]):
        assert cuda.device.type == "cuda" and _rel(cuda, cpu) < 1e-4


LAYOUTS = {"per_tensor": (1, 3001), "grouped": (4, 700), "per_row": (96, 37), "smollm2_row": (64, 1536)}


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", range(1, 9))
def test_triton_kernels_are_as_accurate_as_the_reference(bits, layout, weighted, iters):
    """The Triton forward and backward on the GPU against the chunked float32 path on the CPU, both measured from its
    float64 result (tests/accuracy.py): bits 1-8, per-tensor / grouped / per-row LUTs, importance-weighted or not; one
    iteration (one launch each way where the groups are many or short) and three (a launch per stage)."""
    groups, n = LAYOUTS[layout]
    assert fused.available(torch.zeros(1, 1, 1, device="cuda"))
    w = weights(groups, n, 1, seed=bits)
    assert_as_accurate_as_reference(w, bits, iters, epsilon_scale=0.0, weighted=weighted, device="cuda")


def test_group_variance_on_the_gpu():
    """The relative tau's scale from torch.var on a GPU, as accurate as float32 allows against float64."""
    for shape in [(300, 577, 1), (30, 50, 3)]:
        v = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.5
        truth = (v.double() - v.double().mean(1, keepdim=True)).square().sum((1, 2)) / shape[1]
        got = group_variance(v.cuda())
        assert got.is_cuda and got.shape == (shape[0],) and rel(got, truth) < 1e-5


@pytest.mark.parametrize("d", [2, 3])
def test_triton_kernels_for_vectors(d):
    assert_as_accurate_as_reference(weights(8, 301, d), 3, 3, device="cuda")


@pytest.mark.parametrize("epsilon_scale", [0.0, 300.0, 1e9])
def test_triton_early_stop(epsilon_scale):
    assert_as_accurate_as_reference(weights(4, 700, 1), 4, 6, epsilon_scale, c0_scale=1.5, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_take_16_bit_weights(dtype):
    """A 16-bit weight on the GPU: the float32 loop's results rounded to its dtype (within one rounding of the CPU's
    float32 reference), the gradient in that dtype."""
    w = weights(64, 1536, 1).to(dtype)
    c0 = kmeans_init(w.float(), 16, seed=0)
    tau = (w.float() - w.float().mean(1, keepdim=True)).square().mean((1, 2)) * 0.01
    grad = torch.randn(w.shape).to(dtype)
    ref = run(w.float(), c0, tau, 0.0, 1, "chunked", grad.float())
    got = run(w, c0, tau, 0.0, 1, "fused", grad, device="cuda")
    eps = torch.finfo(dtype).eps
    assert got[0].dtype == got[2].dtype == dtype
    torch.testing.assert_close(got[0], ref[0].to(dtype), rtol=eps, atol=0)
    assert rel(got[2], ref[2]) < eps


def test_triton_ops_pass_opcheck():
    w = weights(3, 1000, 1).cuda()
    c0 = kmeans_init(w, 16, seed=0)
    tau, eps = torch.full((3,), 1e-3, device="cuda"), torch.zeros(3, device="cuda")
    torch.library.opcheck(fused.fused_dkm, (w.clone().requires_grad_(), c0, tau, eps, 3))
    torch.library.opcheck(fused.fused_dkm, (w.bfloat16().requires_grad_(), c0, tau, eps, 1))


def test_the_dkm_loop_never_synchronises_with_the_host():
    """No host synchronisation in the loop (forward and backward; the fused one at one iteration), checked by CUDA's
    sync debug mode."""
    w = weights(2, 4000, 1).cuda().requires_grad_()
    c0 = kmeans_init(w.detach(), 16, seed=0)
    values, counts, _ = unique_buckets(w.detach().squeeze(-1), torch.float16)  # before the loop: it may sync
    dkm_cluster(w, c0, 1e-3, 1, 1e-3, "fused")[0].sum().backward()  # the Triton kernels compiled before
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = dkm_cluster(w, c0, 1e-3, 3, 1e-3, "chunked")
        y.square().sum().backward()
        y, _ = dkm_cluster(w, c0, 1e-3, 1, 1e-3, "fused")  # one iteration (the LLM recipe): no early-stop test
        y.square().sum().backward()
        history, masses, T, _ = ops_dkm._iterate(values.unsqueeze(-1), c0, 1e-3, 3, 1e-3, counts.float())
        ops_dkm._backward(values.unsqueeze(-1), history, masses, T, 1e-3, torch.ones_like(values).unsqueeze(-1))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kmeans_init_is_the_same_on_every_device():
    """The same seeds pick the same points and Lloyd the same assignments; a centroid is then the mean of the same
    weights, summed in the device's order: within 2 (N - 1) U max|w| of the host's for a LUT of N = 3000 weights."""
    w = weights(4, 3000, 1)
    for restarts in (1, 4):
        on_gpu = kmeans_init(w.cuda(), 16, seed=3, restarts=restarts).cpu()
        on_cpu = kmeans_init(w, 16, seed=3, restarts=restarts)
        assert_within(on_gpu, on_cpu, 2 * 3000 * U, w.abs().max().item(), f"centroids, {restarts} restart(s)")


def test_batched_kmeans_runs_on_the_gpu():
    """Per-row groups of several weights batched on the GPU: results there, the CPU's up to rare exact ties."""
    many = [weights(300, 576, 1, seed=s) for s in range(3)] + [weights(100, 1536, 1, seed=3)]
    on_gpu = kmeans_init_many([w.cuda() for w in many], 16, seed=1, restarts=4)
    for w, c in zip(many, on_gpu):
        assert c.is_cuda and c.shape == (w.shape[0], 16, 1)
        same = torch.isclose(c.cpu(), kmeans_init(w, 16, seed=1, restarts=4), atol=1e-6).all(1).squeeze(-1)
        assert same.float().mean() > 0.98


@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
def test_dkm_module_trains_evaluates_and_palettizes_on_cuda(granularity):
    torch.manual_seed(0)
    config = DKMConfig(bits=3, granularity=granularity, group_size=8 if granularity != "per_tensor" else None)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).cuda()
    dkm_hf.prepare(model, config)
    assert model[0].centroids.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(32, 256, device="cuda")
    for _ in range(3):
        model.train()(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        hard = model(x)
    dkm_hf.palettize(model)
    assert model[0].weight_indices.device.type == "cuda"
    with torch.no_grad():
        assert torch.equal(model(x), hard)
    model.to(torch.bfloat16)
    assert model[0].weight_lut.dtype == torch.float16 and model[0].compute_dtype == torch.bfloat16
    assert model(x.bfloat16()).dtype == torch.bfloat16


def test_bf16_llama_trains_and_health_logs_on_cuda(tiny_dir, tmp_path):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16, dkm_config=DKMConfig(bits=3))
    model.cuda()
    args = dkm_hf.DKMTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        logging_steps=1,
        report_to=[],
        per_device_train_batch_size=2,
        bf16=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    ids = tiny_inputs("llama", batch=8)["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = dkm_hf.DKMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all("dkm_entropy" in e for e in logs)
    trainer.save_model(str(tmp_path / "pal"))
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "pal", device_map="cuda")
    model.eval()
    with torch.no_grad():
        inputs = {k: v.cuda() for k, v in tiny_inputs("llama").items()}
        assert torch.equal(reloaded(**inputs).logits, dkm_hf.palettize(model)(**inputs).logits)


def test_gptq_snap_on_cuda(tiny_dir):
    """GPTQ's snapping on the GPU: the same choices as on the CPU up to float reordering (at most 1% of the weights),
    every weight on a centroid, the weights still on the GPU."""
    config, path, batches = DKMConfig(**PER_ROW_2BIT), tiny_dir("llama"), tiny_lm_batches()
    cpu = AUTO["llama"].from_pretrained(path, dkm_config=config)
    gpu = AUTO["llama"].from_pretrained(path, dkm_config=config).cuda()
    skipped = dkm_hf.gptq_snap(cpu, batches)
    assert dkm_hf.gptq_snap(gpu, batches) == skipped
    cpu_states, differing, total = dict(dkm_hf.dkm_modules(cpu)), 0, 0
    for name, state in dkm_hf.dkm_modules(gpu):
        if name in skipped:
            continue
        assert state.weight.is_cuda
        torch.testing.assert_close(state.hard_weight(), state.weight.detach(), rtol=0, atol=0)
        differing += int((state.weight.detach().cpu() != cpu_states[name].weight.detach()).sum())
        total += state.weight.numel()
    assert differing <= total // 100, (differing, total)
