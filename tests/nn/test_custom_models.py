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
        out = dkm_hf.palettize(model)(x)
        # float32 input of a few rows takes the LUT gemv, whose sums run in another order than addmm's (bitwise equal
        # on one CPU, not on another): each of the two sums is within K eps sum |x w| of the exact one, + eps |y|
        eps, w = torch.finfo(dtype).eps, model[0].weight.float()
        bound = 2 * eps * (x.shape[-1] * (x.float().abs() @ w.abs()) + hard.float().abs())
        assert ((out.float() - hard.float()).abs() <= bound).all()


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


class ParentReads(nn.Module):
    """Reads its child's weight directly in its forward (as a Mamba mixer reads `conv1d.weight`)."""

    def __init__(self):
        super().__init__()
        self.proj, self.other = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + nn.functional.linear(x, self.proj.weight, self.proj.bias) + self.other(x)


def _parent_reads_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16), ParentReads(), ParentReads(), nn.Linear(16, 32))
    return dkm_hf.prepare(model, dkm_hf.DKMConfig(bits=2, weight_threshold=0))


def test_ancestor_scopes_hold_no_weight_that_would_not_be_kept_anyway():
    """A train-mode forward without gradients and a soft evaluation compute each clustered weight and drop it in
    turn: an ancestor's scope does not make them all up front there (before: every clustered weight of the model was
    alive at the first layer, a dense copy of the model); a training forward keeps them anyway (for backward), and
    an evaluation keeps its hard weights."""
    model = _parent_reads_model()
    live = {}

    def probe(module, args):
        live["n"] = sum("weight" in m.__dict__ for m in model.modules())

    model[1].register_forward_pre_hook(probe)
    ids = torch.arange(8).view(2, 4)
    model.train()
    with torch.no_grad():
        model(ids)
    no_grad_train = live["n"]
    model.eval()
    for _, state in dkm_hf.dkm_modules(model):
        state.soft_eval = True
    with torch.no_grad():
        model(ids)
    soft_eval = live["n"]
    for _, state in dkm_hf.dkm_modules(model):
        state.soft_eval = False
    with torch.no_grad():
        model(ids)
    # the root's children (embedding, head) and the block's own two; the second block's two when kept anyway
    assert (no_grad_train, soft_eval, live["n"]) == (4, 4, 6)


FSDP_CHILD = """
import copy, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_custom_models import _parent_reads_model
from torch.distributed.fsdp import fully_shard
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
reference = _parent_reads_model().eval()
model = copy.deepcopy(reference)
for block in (model[1], model[2]):
    fully_shard(block)
fully_shard(model)
ids = torch.arange(12).view(2, 6)
with torch.no_grad():
    expected, got = reference(ids), model.eval()(ids)
got = got.full_tensor() if hasattr(got, "full_tensor") else got
print("DIFF", (got - expected).abs().max().item())
dist.destroy_process_group()
"""


def test_under_fsdp2_a_parent_reading_its_childs_weight_reads_the_clustered_one():
    """The root's scope runs while FSDP2 still shards the blocks' weights: they are left to the blocks' own scopes
    (before: marked as shadowed, so the blocks computed with the dense weight, 1.4e-4 off at 2 bits)."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", FSDP_CHILD, here, str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("DIFF")[-1]) == 0.0


def test_vmap_over_a_dkm_model_in_eval_mode():
    """torch.func.vmap runs the eval forward, whose hard weights sit in the weight's graph (before: the autograd
    Function that warns on backward had no vmap rule)."""
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), CONFIG).eval()
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(torch.func.vmap(model)(x), model(x))


def test_a_save_goes_on_while_another_thread_runs_a_model_clustered_at_its_root(tmp_path):
    """Saves of one model take turns with each other, not with its forwards: on a model whose root module holds a
    clustered parameter, the save waited for the forward lock every forward of the root holds (before: a save from
    another thread waited for the forward, and one the forward waited on never finished)."""
    import threading

    model = dkm_hf.prepare(PosModel(TinyConfig()), dkm_hf.DKMConfig(bits=4))
    inside, release, saved = threading.Event(), threading.Event(), threading.Event()

    def wait_inside(module, args):
        inside.set()
        release.wait(30)

    handle = model.blk.register_forward_pre_hook(wait_inside)
    worker = threading.Thread(target=lambda: model(torch.randn(1, 64, 64)))
    worker.start()
    assert inside.wait(30)  # the root's forward, holding its lock, waits in the hook
    saver = threading.Thread(target=lambda: (model.save_pretrained(tmp_path / "out"), saved.set()))
    saver.start()
    saver.join(30)
    saved_during_the_forward = saved.is_set()
    release.set()
    worker.join(30)
    saver.join(30)
    handle.remove()
    assert saved_during_the_forward
    assert PosModel.from_pretrained(tmp_path / "out").pos_embed.shape == (1, 64, 64)
