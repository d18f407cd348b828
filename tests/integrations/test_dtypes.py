"""bf16 / fp16 end to end: loading, training, casting, autocast, saving and reloading DKM and palettized models."""

from __future__ import annotations

import pytest
import torch
from conftest import AUTO, tiny_inputs
from reference import weights
from torch import nn

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.ops.dkm import dkm_cluster
from dkm_hf.ops.kmeans import kmeans_init


def _logits(model, name="llama"):
    with torch.no_grad():
        return model.eval()(**tiny_inputs(name)).logits


def test_bf16_llama_trains_saves_and_reloads_its_hard_model_exactly(tiny_dir, tmp_path):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16, dkm_config=DKMConfig(bits=3))
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.centroids.dtype == torch.float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = tiny_inputs("llama", batch=4)
    model.train()
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
        loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.centroids.dtype == torch.float32
    hard = _logits(model)
    dkm_hf.palettize(model)
    assert torch.equal(_logits(model), hard)
    model.save_pretrained(tmp_path / "bf16")
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "bf16")
    assert reloaded.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert torch.equal(_logits(reloaded), hard)


def _same_clustering(a, b) -> None:
    """Every clustered module of `a` and `b` holds the same state and uses the same weight in evaluation."""
    pairs = list(zip(dkm_hf.dkm_modules(a.eval()) or dkm_hf.palettized_modules(a), dkm_hf.dkm_modules(b.eval())
                     or dkm_hf.palettized_modules(b)))  # fmt: skip
    assert pairs
    for (name, x), (_, y) in pairs:
        weight = (lambda w: w.hard_weight()) if isinstance(x, dkm_hf.DKMWeight) else (lambda w: w.weight)
        assert torch.equal(weight(x), weight(y)), name
        buffers_x, buffers_y = x.module._buffers, y.module._buffers
        assert list(buffers_x) == list(buffers_y), name
        assert all(torch.equal(buffers_x[key], buffers_y[key]) for key in buffers_x), name


@pytest.mark.parametrize(
    ("dtype", "lut_dtype"), [(torch.float16, "float16"), (torch.float16, "float32"), (torch.bfloat16, "float16")]
)
def test_a_targeted_keep_in_fp32_module_round_trips_in_half_precision(tmp_path, dtype, lut_dtype):
    """T5's `wo`, clustered by name, in a float16 model: transformers keeps it in float32 and loaded its LUT as
    float32, so the reload failed its checksum; the reload decodes to float32 from the LUT as stored (a float32 LUT
    too, which transformers leaves as it is)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "dense")
    cfg = DKMConfig(bits=4, weight_threshold=0, target_modules=[".*"], lut_dtype=lut_dtype)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "dense", dtype=dtype, dkm_config=cfg)
    kept = torch.float32 if dtype == torch.float16 else dtype  # transformers' rule for _keep_in_fp32_modules
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == kept
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "labels": torch.randint(0, 64, (2, 5))}
    model(**inputs).loss.backward()
    with torch.no_grad():
        hard = model.eval()(**inputs).logits
        model.save_pretrained(tmp_path / "train")
        train = T5ForConditionalGeneration.from_pretrained(tmp_path / "train").eval()(**inputs).logits
        dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
        reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "pal")
        wo = reloaded.encoder.block[0].layer[1].DenseReluDense.wo
        assert str(wo.weight_lut.dtype) == f"torch.{lut_dtype}" and wo.weight.dtype == kept
        for logits in (train, model(**inputs).logits, reloaded(**inputs).logits):
            torch.testing.assert_close(logits, hard, rtol=0, atol=0)


def test_fp32_to_bf16_cast_round_trips(tiny_dir, tmp_path):
    """A DKM model cast to bf16 keeps float32 centroids and saves a training checkpoint that reloads; a palettized
    model cast to bf16 keeps its float16 LUTs and saves a checkpoint its own loader accepts, computing the same.
    (Logits are not compared: `model.to(bf16)` also casts Llama's rotary buffers, which loading keeps in float32.)"""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3))
    centroids = model.model.layers[0].mlp.up_proj.centroids.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.up_proj.centroids, centroids)  # never rounded to bf16
    model.save_pretrained(tmp_path / "train-bf16")
    loaded = AUTO["llama"].from_pretrained(tmp_path / "train-bf16")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    _same_clustering(model, loaded)

    palettized = dkm_hf.palettize(AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3)))
    lut = palettized.model.layers[0].mlp.up_proj.weight_lut.clone()
    palettized.bfloat16()
    layer = palettized.model.layers[0].mlp.up_proj
    assert torch.equal(layer.weight_lut, lut) and layer.compute_dtype == torch.bfloat16
    palettized.save_pretrained(tmp_path / "pal-bf16")
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "pal-bf16")
    assert reloaded.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    _same_clustering(palettized, reloaded)
    palettized.float()  # and back: the decoded weight follows, the LUT stays
    assert palettized.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_half_and_autocast():
    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), DKMConfig(bits=2))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32 and model[0].weight.grad.abs().sum() > 0
    model.half()
    assert model[0].weight.dtype == torch.float16 and model[0].centroids.dtype == torch.float32
    with torch.no_grad():
        assert model.eval()(x.half()).dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uniquified_path_is_exact_for_16_bit_weights(dtype):
    """A 16-bit weight is its own bucket: the uniquified path equals the exact chunked path on the same values."""
    w = weights(1, 20000, 1).to(dtype).float()  # values a bf16 / fp16 weight takes
    c0 = kmeans_init(w, 16, seed=0)
    grad = torch.randn(w.shape)
    results = {}
    for implementation in ("chunked", "uniquified"):
        x = w.clone().requires_grad_()
        y, c = dkm_cluster(x, c0, 1e-3, 3, 0.0, implementation, bucket_dtype=dtype)
        (y * grad).sum().backward()
        results[implementation] = (y.detach(), c, x.grad)
    for exact, unique in zip(results["chunked"], results["uniquified"]):
        assert ((unique - exact).norm() / exact.norm()).item() < 1e-5
