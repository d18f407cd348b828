"""torch.compile, torch.fx / torch.export, and copies taken in the middle of a forward or a palettized view."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import AUTO, tiny_inputs
from torch import nn

import dkm_hf


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    return dkm_hf.prepare(net, dkm_hf.DKMConfig(bits=3, weight_threshold=0))


def test_a_compiled_training_step_equals_the_eager_one():
    """Compiled with graph breaks, two of the three clustered weights ran the DKM loop twice per forward (the caches'
    checks ran at other times under dynamo): centroids, losses and gradients drifted from eager (12% in a gradient)
    without a word. The clustered weight now runs eagerly, outside the graph."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        net = _net().train()
        step = torch.compile(net, backend="eager") if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        record = []
        for i in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))
            loss = step(x).square().mean()
            loss.backward()
            record.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
            optimizer.step()
            optimizer.zero_grad()
        record.append([m.centroids.clone() for _, m in dkm_hf.dkm_modules(net)])
        runs.append(record)
    for (eager_loss, eager_grads), (loss, grads) in zip(runs[0][:3], runs[1][:3]):
        assert torch.equal(loss, eager_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))


@pytest.mark.parametrize("state", ["dkm-train", "dkm-eval", "packed", "dense"])
def test_fx_and_export_refuse_clustered_weights_by_name(state):
    """torch.fx froze a clustered weight into the traced graph as a constant (the traced module lost those parameters
    and ignored later updates, silently); torch.export failed inside the caches' checks ("Cannot access data pointer
    of Tensor (FakeTensor)")."""
    net = _net()
    if state == "dkm-eval":
        net.eval()
    elif state in ("packed", "dense"):
        dkm_hf.set_inference_mode(dkm_hf.palettize(net), state)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"dkm_hf: a (DKM|Palettized)Conv2d cannot be traced .*dkm_hf\.dequantize"):
        torch.fx.symbolic_trace(net)
    with pytest.raises(RuntimeError, match=r"cannot be traced by torch\.fx, torch\.jit\.trace or torch\.export"):
        torch.export.export(net, (x,))
    dense = dkm_hf.dequantize(net)
    torch.testing.assert_close(torch.fx.symbolic_trace(dense)(x), dense(x), rtol=0, atol=0)


def test_a_copy_taken_inside_a_forward_keeps_no_clustered_weights_as_attributes(tiny_dir):
    """A deepcopy made from a hook inside a decoder layer's forward copied the clustered weights the scopes had put in
    front of the parameters: the copy's `q_proj.weight` stayed a stale hard tensor, not its parameter."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(bits=2, weight_threshold=0))
    model.eval()
    copies = []
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, output: copies.append(copy.deepcopy(model)))
    with torch.no_grad():
        model(**tiny_inputs("llama"))
    handle.remove()
    (copied,) = copies
    shadows = [n for n, m in copied.named_modules() if set(getattr(m, "dkm_weights", {})) & set(m.__dict__)]
    assert shadows == []
    assert (
        copied.model.layers[0].self_attn.q_proj.weight is copied.model.layers[0].self_attn.q_proj._parameters["weight"]
    )


def test_a_copy_taken_inside_a_palettized_view_sheds_the_views_scopes(tiny_dir):
    """The copy is palettized but carried the view's parent-scope hooks (78 on a 12-layer Llama, a batch-1 forward
    20-25% slower on a tiny model); they go at its first forward, and the model the view gives back keeps its own."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(bits=2, weight_threshold=0))
    model.eval()
    with dkm_hf.palettized_view(model):
        copied = copy.deepcopy(model)
        with torch.no_grad():
            model(**tiny_inputs("llama"))  # a forward inside the view: the scopes of the model go and come back
    hooked = lambda m: [n for n, s in m.named_modules() if "_dkm_parent_scope" in s.__dict__]  # noqa: E731
    before = hooked(model)
    assert before and hooked(copied)
    with torch.no_grad():
        out = copied(**tiny_inputs("llama")).logits
    assert [n for n in hooked(copied) if n] in ([], ["model.layers"])  # a ModuleList is never called
    assert hooked(model) == before
    torch.testing.assert_close(out, dkm_hf.palettize(copy.deepcopy(model))(**tiny_inputs("llama")).logits)


@pytest.mark.parametrize("train", [True, False])
def test_jit_trace_refuses_dkm_modules_and_follows_palettized_ones(train):
    """A traced DKM module drifted from eager in training (loss 3e-3 off within 3 steps) and failed at its second
    call in eval mode; a palettized model traces as it runs (the decode is part of the graph)."""
    net = _net().train(train)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"DKMConv2d cannot be traced by torch\.fx, torch\.jit\.trace"):
        torch.jit.trace(net, (x,))
    pal = dkm_hf.palettize(net)
    with torch.no_grad():
        traced = torch.jit.trace(pal, (x,))
        torch.testing.assert_close(traced(x + 1), pal(x + 1), rtol=0, atol=0)


class _Mixer(nn.Module):  # reads its child's weight directly, as a Mamba mixer does
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return x @ self.proj.weight.t()


class _Top(nn.Module):  # reads a deeper weight directly, as a hand-written LM head does
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(_Mixer(), nn.ReLU(), _Mixer())

    def forward(self, x):
        return self.net(x) @ self.net[0].proj.weight


def test_a_forward_inside_a_view_of_a_submodule_keeps_the_outer_scopes():
    """With the view open on `net`, the outer module found no DKM module below it and removed its scopes for good:
    afterwards it read the raw parameter, and the model in eval mode no longer equalled its palettized model."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(_Top(), dkm_hf.DKMConfig(bits=2, weight_threshold=0)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        reference = dkm_hf.palettize(copy.deepcopy(model))(x)
        with dkm_hf.palettized_view(model.net):
            model(x)
            dkm_hf.palettize(model)  # already palettized inside the view: its scopes stay too
        assert "_dkm_parent_scope" in model.__dict__
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


@pytest.mark.parametrize("state", ["dkm", "palettized"])
def test_a_module_of_a_subclass_of_its_variant_copies(state):
    """torch's parametrize makes a subclass of the module's class (`ParametrizedDKMLinear`), whose copies and
    replicas call `cls.__new__(cls)`; a variant class's own `__new__` (which builds the base class when called with
    arguments, as peft does) recursed there. Called with arguments, a variant builds a plain module."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, bias):
            return 2 * bias

    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(16, 8)), dkm_hf.DKMConfig(bits=2, weight_threshold=0)).eval()
    model = dkm_hf.palettize(model) if state == "palettized" else model
    assert type(type(model[0])(16, 8)) is nn.Linear
    parametrize.register_parametrization(model[0], "bias", Double())
    x = torch.randn(3, 16)
    copied = copy.deepcopy(model)
    replica = model[0]._replicate_for_data_parallel()
    with torch.no_grad():
        assert torch.equal(copied(x), model(x)) and torch.equal(replica(x), model[0](x))
