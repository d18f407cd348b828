"""The weight, not the module: a clustered module keeps its own class and forward, any parameter of >= 2 dimensions
can be clustered (stacked experts with one LUT per expert), and models pickle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dkm_hf
from dkm_hf import DKMConfig


class ScaledEmbedding(nn.Embedding):
    """A subclass with its own forward and an extra argument (as transformers' *ScaledWordEmbedding and learned
    positional embeddings have)."""

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids, offset: int = 0):
        return super().forward(ids + offset) * self.embed_scale


class Experts(nn.Module):
    """Stacked experts as transformers 5 holds them: 3-D parameters indexed per expert inside the forward."""

    def __init__(self, experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner) * 0.1)

    def forward(self, x, expert: torch.Tensor):
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            rows = expert == e
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, self.down_proj[e])
        return out


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = ScaledEmbedding(50, 16, 4.0)
        self.experts = Experts(3, 16, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.embed(ids, offset=1)
        return self.head(self.experts(h, ids % 3))


def _reference(model: Model, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The forward of `model` computed by hand from the given weights."""
    h = F.embedding(ids + 1, weights["embed"]) * 4.0
    out = torch.zeros_like(h)
    for e in range(3):
        rows = ids % 3 == e
        gate, up = F.linear(h[rows], weights["experts.gate_up_proj"][e]).chunk(2, dim=-1)
        out[rows] = F.linear(F.silu(gate) * up, weights["experts.down_proj"][e])
    return F.linear(out, weights["head"], model.head.bias)


@pytest.fixture
def prepared():
    torch.manual_seed(0)
    return dkm_hf.prepare(Model(), DKMConfig(bits=2, weight_threshold=0)).eval()


def test_modules_keep_their_class_forward_and_extra_arguments(prepared):
    ids = torch.randint(0, 49, (4, 6))
    assert isinstance(prepared.embed, ScaledEmbedding) and isinstance(prepared.experts, Experts)
    names = [name for name, _ in dkm_hf.dkm_modules(prepared)]
    assert names == ["embed", "experts.gate_up_proj", "experts.down_proj", "head"]
    hard = {name: w.hard_weight() for name, w in dkm_hf.dkm_modules(prepared)}
    with torch.no_grad():
        out = prepared(ids)
    torch.testing.assert_close(out, _reference(prepared, hard, ids), rtol=1e-6, atol=1e-6)
    # outside the forward every parameter is the float parameter the optimiser trains
    assert isinstance(prepared.embed.weight, nn.Parameter) and "weight" not in prepared.embed.__dict__
    dkm_hf.palettize(prepared)
    assert isinstance(prepared.embed, ScaledEmbedding) and type(prepared.embed).__name__ == "PalettizedScaledEmbedding"
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids), out, rtol=0, atol=0)
    dkm_hf.dequantize(prepared)
    assert type(prepared.embed) is ScaledEmbedding and type(prepared.experts) is Experts
    with torch.no_grad():
        torch.testing.assert_close(prepared(ids), out, rtol=0, atol=0)


def test_stacked_experts_get_one_lut_per_expert(prepared):
    weights = dict(dkm_hf.dkm_modules(prepared))
    gate_up = weights["experts.gate_up_proj"]
    assert gate_up.layout.channel_dims == 2 and gate_up.layout.groups == 3 and gate_up.layout.channels == 3 * 16
    assert tuple(prepared.experts.gate_up_proj_centroids.shape) == (3, 4, 1)
    for e in range(3):  # each expert's weights take at most 2**bits values, its own
        assert gate_up.hard_weight()[e].unique().numel() <= 4
    experts = ["experts.gate_up_proj", "experts.down_proj"]
    grouped = {"bits": 2, "granularity": "per_grouped_channel", "target_modules": experts, "weight_threshold": 0}
    per_row = DKMConfig(group_size=4, **grouped)
    per_row = dkm_hf.prepare(Model(), per_row)
    assert dict(dkm_hf.dkm_modules(per_row))["experts.gate_up_proj"].layout.groups == 3 * 16 // 4
    with pytest.raises(ValueError, match="straddle the 3 experts"):
        dkm_hf.prepare(Model(), DKMConfig(group_size=12, **grouped))


def test_a_training_step_reaches_every_clustered_parameter_once_per_forward(prepared, monkeypatch):
    """The experts' weights are read 2 x 3 times in a forward (and the model, their parent, shadows its children's
    weights too): each clustered weight still costs one DKM pass."""
    from dkm_hf.nn import dkm as dkm_module

    passes = []
    original = dkm_module.dkm_cluster
    monkeypatch.setattr(
        dkm_module, "dkm_cluster", lambda w, *a, **k: passes.append(tuple(w.shape)) or original(w, *a, **k)
    )
    prepared.train()
    prepared(torch.randint(0, 49, (4, 6))).square().mean().backward()
    assert sorted(passes) == sorted([(1, 50 * 16, 1), (3, 16 * 16, 1), (3, 16 * 8, 1), (1, 5 * 16, 1)])
    for name, weight in dkm_hf.dkm_modules(prepared):
        assert weight.weight.grad is not None and torch.isfinite(weight.weight.grad).all(), name


@pytest.mark.parametrize("form", ["dkm", "palettized"])
def test_models_pickle_and_deepcopy_after_import(prepared, form):
    ids = torch.randint(0, 49, (2, 5))
    if form == "palettized":
        dkm_hf.palettize(prepared)
    with torch.no_grad():
        out = prepared(ids)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer, weights_only=False), copy.deepcopy(prepared)):
        assert type(restored.embed) is type(prepared.embed)
        with torch.no_grad():
            assert torch.equal(restored(ids), out)


def test_a_palettized_model_counts_its_weights_and_the_memory_it_holds(tiny_dir):
    from conftest import AUTO, tiny_inputs

    dense = AUTO["llama"].from_pretrained(tiny_dir("llama"))
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=4, weight_threshold=0))
    dkm_hf.palettize(model)
    assert model.num_parameters() == dense.num_parameters()
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    packed = model.get_memory_footprint()
    assert packed < dense.get_memory_footprint() / 4  # 4-bit indices and small LUTs, nothing decoded kept
    dkm_hf.set_inference_mode(model, "dense")
    with torch.no_grad():
        model(**tiny_inputs("llama"))
    decoded = sum(w.decoded_bytes for _, w in dkm_hf.palettized_modules(model) if w.tied_source is None)
    assert decoded > 0 and model.get_memory_footprint() == packed + decoded
