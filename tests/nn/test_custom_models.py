"""Models written by hand in torch, wrapped in a PreTrainedModel: what their forwards read of a clustered weight is
what the palettized model holds, and the modules DKM cannot train are left alone or refused by name."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

import dkm_hf

CONFIG = dkm_hf.DKMConfig(bits=2, weight_threshold=0)


class TinyConfig(PretrainedConfig):
    model_type = "dkm_hf_tiny_custom"


class TopTiedLM(PreTrainedModel):
    """A hand-written LM whose top forward multiplies by its embedding's weight (a manual tie, two levels up)."""

    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(16, 8), "mlp": nn.Linear(8, 8)})
        self.post_init()

    def forward(self, ids):
        h = torch.relu(self.transformer["mlp"](self.transformer["wte"](ids)))
        return h @ self.transformer["wte"].weight.T


class Block(GradientCheckpointingLayer):
    """Holds its Linear layers directly (no attention / MLP submodule in between)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


def _trained(model, steps: int = 3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.arange(12).view(3, 4) % 16
    model.train()
    for _ in range(steps):
        model(ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return ids


@torch.no_grad()
def test_a_weight_read_by_a_grandparents_forward_is_the_clustered_one(tmp_path):
    """The top forward reads `transformer.wte.weight`: it sees the hard weight in eval (before: the dense one, 6.3 off
    the palettized model at 2 bits), and the palettized model reloaded from disk gives the same logits."""
    model = dkm_hf.prepare(TopTiedLM(TinyConfig()), CONFIG)
    with torch.enable_grad():
        ids = _trained(model)
    model.eval()
    hard = model(ids)
    wte = model.transformer["wte"]
    h = torch.relu(model.transformer["mlp"](wte(ids)))
    torch.testing.assert_close(hard, h @ wte.dkm_weights["weight"].hard_weight().T, rtol=0, atol=0)
    assert not torch.allclose(hard, h @ wte.weight.T)
    dkm_hf.palettize(model).save_pretrained(tmp_path / "out")
    reloaded = TopTiedLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(reloaded(ids), hard)  # float32 rounding of another kernel; the bug was 6.3


def test_reentrant_checkpointing_of_a_block_holding_its_layers_gives_the_uncheckpointed_step():
    """A checkpointed forward that runs without gradients (reentrant) uses the soft weights its recomputation will:
    the loss and the gradients equal the step without checkpointing (before: 1e-4 off in the loss, 8.5e-3 in the
    gradient at 3 bits)."""

    def step(use_checkpoint: bool):
        torch.manual_seed(0)
        model = nn.Sequential(Block(), Block())
        dkm_hf.prepare(model, dkm_hf.DKMConfig(bits=3, weight_threshold=0))
        for block in model:  # transformers' layers checkpoint `forward`: the block's own hooks run outside
            block.gradient_checkpointing = use_checkpoint
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)
        loss = model(torch.randn(4, 8, requires_grad=True)).square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.detach(), grads, [s.centroids.clone() for _, s in dkm_hf.dkm_modules(model)]

    plain, checkpointed = step(False), step(True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    # the recomputed backward sums in another order: float32 rounding (~1e-6 relative), not the 8.5e-3 of before
    for got, want in zip(checkpointed[1] + checkpointed[2], plain[1] + plain[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_a_backward_through_an_eval_forward_warns_that_the_clustered_weights_get_nothing():
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), CONFIG).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(torch.randn(3, 8))  # an eval forward with gradients on (input attributions) does not warn
        assert not [w for w in caught if "dkm_hf" in str(w.message)]
        out.sum().backward()
    assert any("computes with its hard (snapped) weights" in str(w.message) for w in caught)
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_a_palettized_lstm_casts_and_moves():
    """An RNN rebuilds its flat weights inside `_apply`, reading every weight: the LUTs stay in place meanwhile
    (before: KeyError on `weight_ih_l0_lut`, and the module was left broken)."""
    torch.manual_seed(0)
    model = dkm_hf.palettize(dkm_hf.prepare(nn.Sequential(nn.LSTM(8, 16, batch_first=True)), CONFIG))
    x = torch.randn(2, 3, 8)
    expected = model(x)[0]
    lut = model[0].weight_ih_l0_lut.clone()
    cast = copy.deepcopy(model).to(torch.float64).to("cpu")
    torch.testing.assert_close(cast(x.double())[0], expected.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(cast[0].weight_ih_l0_lut, lut)  # the LUT keeps its dtype and values
    torch.testing.assert_close(cast.float()(x)[0], expected)


def test_sparse_embeddings_are_left_dense_and_lazy_modules_are_refused_by_name(caplog):
    model = nn.Sequential(nn.Embedding(64, 8, sparse=True), nn.Linear(8, 8))
    dkm_hf.prepare(model, CONFIG)
    assert [name for name, _ in dkm_hf.dkm_modules(model)] == ["1"]
    model[0](torch.tensor([1, 2])).sum().backward()  # sparse gradients still work (before: a reshape error)
    with pytest.raises(ValueError, match=r"0\.weight is not materialised yet .*run the model once"):
        dkm_hf.prepare(nn.Sequential(nn.LazyLinear(4)), CONFIG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniquified_per_row_luts_of_a_transposed_weight(dtype):
    """transformers' Conv1D stores (in, out): its per-row vectors are a transposed view, which the uniquified path
    now reads (before: a `view` error on the first forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8)).to(dtype)
    config = dkm_hf.DKMConfig(
        bits=3, weight_threshold=0, granularity="per_grouped_channel", group_size=1, implementation="uniquified"
    )
    dkm_hf.prepare(model, config)
    x = torch.randn(2, 8, dtype=dtype)
    model.train()
    model(x).sum().backward()
    assert model[0].weight.grad is not None
    with torch.no_grad():
        hard = model.eval()(x)
        torch.testing.assert_close(dkm_hf.palettize(model)(x), hard, rtol=0, atol=0)


class TwoProjModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(4, 4)  # small: left dense by the threshold
        self.block = nn.ModuleDict({"proj": nn.Linear(64, 64)})
        self.post_init()

    def forward(self, x):
        return self.block["proj"](x)


@torch.no_grad()
def test_a_dense_weight_named_like_the_end_of_a_clustered_one_is_not_taken_for_it(tmp_path):
    """The dense `proj.weight` is what `block.proj.weight` ends with: saved names are matched exactly or through the
    model's base prefix only (before: the palettized checkpoint was refused on reload, 'must store its LUT and packed
    indices, not a dense weight')."""
    model = dkm_hf.prepare(TwoProjModel(TinyConfig()), dkm_hf.DKMConfig(bits=2, weight_threshold=1000))
    assert [name for name, _ in dkm_hf.dkm_modules(model)] == ["block.proj"]
    model.eval()
    x = torch.randn(2, 64)
    expected = model(x)
    dkm_hf.palettize(model).save_pretrained(tmp_path / "out")
    # the packed LUT kernel sums in another order than F.linear: float32 rounding
    torch.testing.assert_close(TwoProjModel.from_pretrained(tmp_path / "out")(x), expected)


class PosModel(PreTrainedModel):
    """Holds a clustered parameter itself (a hand-written ViT's position embedding): its class is swapped."""

    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.pos_embed = nn.Parameter(torch.randn(1, 64, 64) * 0.02)
        self.blk = nn.Linear(64, 64)
        self.post_init()

    def forward(self, x):
        return self.blk(x + self.pos_embed)


def test_a_model_holding_a_clustered_parameter_keeps_its_name_in_config_json(tmp_path):
    import json

    model = dkm_hf.prepare(PosModel(TinyConfig()), dkm_hf.DKMConfig(bits=4))
    assert "pos_embed" in [name for name, _ in dkm_hf.dkm_modules(model)]
    model.save_pretrained(tmp_path / "train")
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    for folder in ("train", "pal"):  # before: "DKMPosModel" and "PalettizedPosModel"
        assert json.loads((tmp_path / folder / "config.json").read_text())["architectures"] == ["PosModel"]


def test_gradient_accumulation_through_an_embedding_with_max_norm():
    """nn.Embedding(max_norm=...) renormalises the weight its forward reads in place: the cached soft weight is
    recomputed once written into (before: the second accumulated backward ran through a freed graph), and the hard
    weight stays what the palettized model holds."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(100, 6, max_norm=1.0))
    model = dkm_hf.prepare(copy.deepcopy(dense), dkm_hf.DKMConfig(bits=3, weight_threshold=0))
    ids = torch.randint(0, 100, (3, 4), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids).pow(2).mean().backward()
    assert model[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        before = model[0].dkm_weights["weight"].hard_weight().clone()
        model(ids)
        torch.testing.assert_close(model[0].dkm_weights["weight"].hard_weight(), before, rtol=0, atol=0)
