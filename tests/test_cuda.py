"""The core, module and trainer paths on CUDA, against the same computation on the CPU.

Skipped where no GPU is visible. `bash scripts/cuda_check.sh` runs these plus the CUDA benchmark suites in one go.
"""

from __future__ import annotations

import pytest
import torch
from conftest import AUTO, U, assert_within, tiny_inputs
from reference import weights
from torch import nn

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.ops import dkm as ops_dkm
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


def test_the_dkm_loop_never_synchronises_with_the_host():
    """No host synchronisation in the loop (forward and backward), checked by CUDA's sync debug mode."""
    w = weights(2, 4000, 1).cuda().requires_grad_()
    c0 = kmeans_init(w.detach(), 16, seed=0)
    values, counts, _ = unique_buckets(w.detach().squeeze(-1), torch.float16)  # before the loop: it may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, _ = dkm_cluster(w, c0, 1e-3, 3, 1e-3, "chunked")
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
