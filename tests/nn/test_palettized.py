"""Palettized modules: decoding, the two inference modes, and casts that keep the stored LUT dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import linear_rounding
from torch import nn

import dkm_hf
from dkm_hf.nn.palettized import PalettizedMixin


def _palettized(per_channel_scale=False, cluster_dim=1, group_size=None):
    torch.manual_seed(0)
    config = dkm_hf.DKMConfig(
        bits=3,
        cluster_dim=cluster_dim,
        per_channel_scale=per_channel_scale,
        granularity="per_grouped_channel" if group_size else "per_tensor",
        group_size=group_size,
        weight_threshold=0,
    )
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Embedding(40, 16)), config).eval()
    hard = [model[0].hard_weight().clone(), model[2].hard_weight().clone()]
    return dkm_hf.palettize(model), hard


@pytest.mark.parametrize(("scale", "cluster_dim", "group_size"), [(False, 1, None), (True, 2, None), (True, 1, 8)])
def test_decoded_weight_is_the_dkm_hard_weight(scale, cluster_dim, group_size):
    model, hard = _palettized(scale, cluster_dim, group_size)
    assert isinstance(model[0], PalettizedMixin) and isinstance(model[0], nn.Linear)
    assert torch.equal(model[0].weight, hard[0]) and torch.equal(model[2].weight, hard[1])
    assert "weight" not in dict(model[0].named_parameters())


@pytest.mark.parametrize("value", ["parameter", "tensor"])
def test_assigning_a_palettized_weight_is_refused_by_name(value):
    model, hard = _palettized()
    new = torch.zeros(48, 64)
    with pytest.raises(AttributeError, match=r"PalettizedLinear.weight is decoded from its LUT .*model\.dequantize"):
        model[0].weight = nn.Parameter(new) if value == "parameter" else new
    assert torch.equal(model[0].weight, hard[0])  # nothing changed
    model[0].bias = nn.Parameter(torch.ones(48))  # the module's other parameters as before
    assert torch.equal(model[0].bias, torch.ones(48))


@torch.no_grad()  # inference: a bias that needs its gradient takes F.linear's path, not the fused gemv
def test_packed_mode_decodes_per_forward_and_matches_dense():
    model, hard = _palettized(True)
    x = torch.randn(5, 64)
    dkm_hf.set_inference_mode(model, "dense")  # palettize() leaves packed mode: the reference is the dense one
    assert model[0].inference_mode == "dense"
    dense = model[0](x)
    assert torch.equal(dense, nn.functional.linear(x, hard[0], model[0].bias))  # the same weight, decoded
    dkm_hf.set_inference_mode(model, "packed")
    assert model[0].inference_mode == "packed" and model[0].palettized_weights["weight"]._dense is None
    packed = model[0](x)  # the fused gemv: another summation order
    assert ((packed - dense).abs() <= linear_rounding(x, hard[0], model[0].bias)).all()
    assert model[0].palettized_weights["weight"]._dense is None
    with pytest.raises(ValueError, match="inference mode must be one of"):
        dkm_hf.set_inference_mode(model, "sparse")


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "to_fp16_then_float"])
def test_casts_follow_the_compute_dtype_and_keep_the_lut(cast):
    model, hard = _palettized(True)
    lut, scale = model[0].weight_lut.clone(), model[0].weight_scale.clone()
    if cast == "to_bf16":
        model.to(torch.bfloat16)
        dtype = torch.bfloat16
    elif cast == "half":
        model.half()
        dtype = torch.float16
    elif cast == "bfloat16":
        model.bfloat16()
        dtype = torch.bfloat16
    else:
        model.to(torch.float16).float()
        dtype = torch.float32
    layer = model[0]
    assert layer.compute_dtype == dtype and layer.weight.dtype == dtype and layer.bias.dtype == dtype
    assert layer.weight_lut.dtype == torch.float16 and torch.equal(layer.weight_lut, lut)  # never rounded
    assert torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.weight, hard[0].to(dtype))
    assert layer(torch.randn(2, 64, dtype=dtype)).dtype == dtype
    model.to("cpu")  # a device move keeps the compute dtype
    assert model[0].compute_dtype == dtype


@pytest.mark.parametrize(
    ("features", "bits", "cluster_dim", "group_size", "scale"),
    [(16, 4, 1, None, False), (16, 3, 2, 4, True), (24, 2, 1, 8, False), (10, 3, 1, None, True), (16, 8, 1, 1, False)],
)
def test_packed_embedding_decodes_only_the_rows_it_looks_up(features, bits, cluster_dim, group_size, scale):
    torch.manual_seed(0)
    config = dkm_hf.DKMConfig(
        bits=bits,
        cluster_dim=cluster_dim,
        per_channel_scale=scale,
        granularity="per_grouped_channel" if group_size else "per_tensor",
        group_size=group_size,
        weight_threshold=0,
    )
    model = dkm_hf.palettize(dkm_hf.prepare(nn.Sequential(nn.Embedding(40, features)), config))
    ids = torch.tensor([[3, 7, 3, 39], [0, 1, 2, 7]])
    dkm_hf.set_inference_mode(model, "dense")  # palettize() leaves packed mode: the reference is the dense one
    dense = model(ids)
    layer = model[0]
    assert layer.inference_mode == "dense" and torch.equal(dense, layer.weight[ids])
    assert torch.equal(layer.palettized_weights["weight"].decode_rows(torch.tensor([39, 3])), layer.weight[[39, 3]])
    dkm_hf.set_inference_mode(model, "packed")
    assert torch.equal(model(ids), dense)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_dense_mode_follows_a_load_state_dict(context):
    """Dense mode keeps the decoded weight between forwards; loading other LUTs and indices replaces it (a stale
    decoded weight would keep the old model's output). Under inference_mode too: palettized there, the buffers were
    inference tensors, which a load there writes without bumping a version (before: the stale weight stayed)."""

    def palettized(seed):
        torch.manual_seed(seed)
        model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 48)), dkm_hf.DKMConfig(bits=3, weight_threshold=0))
        with context():
            return dkm_hf.palettize(model.eval())

    model, other = palettized(0), palettized(1)
    dkm_hf.set_inference_mode(model, "dense")
    x = torch.randn(16, 64)
    with context():
        before = model(x)
        model.load_state_dict(other.state_dict())
        after = model(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, nn.functional.linear(x, other[0].weight, other[0].bias))


def test_each_thread_decodes_in_a_scope_of_its_own():
    """A forward decodes each weight once, in a scope of its own thread: the scope was the module's, so a forward under
    inference_mode in one thread handed its decoded weights (inference tensors) to another thread's forward, whose
    autograd could not save them ("Inference tensors cannot be saved for backward")."""
    import threading

    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Conv2d(4, 8, 3)), dkm_hf.DKMConfig(bits=3, weight_threshold=0))
    conv = dkm_hf.palettize(model.eval())[0]
    x, outcome = torch.randn(1, 4, 6, 6, requires_grad=True), {}

    def backward():
        try:
            conv(x).sum().backward()
        except RuntimeError as error:
            outcome["error"] = error

    with torch.inference_mode(), conv.decode_scope():
        held = conv.weight
        assert held.is_inference() and conv.weight is held  # decoded once within the scope
        thread = threading.Thread(target=backward)
        thread.start()
        thread.join()
    assert "error" not in outcome, outcome
    reference = x.detach().requires_grad_()
    nn.functional.conv2d(reference, conv.weight, conv.bias).sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_a_tied_weight_follows_a_load_into_its_source_alone():
    """A palettized head tied to the embedding decodes the embedding's LUT and indices: dense mode kept the head's
    decoded weight after a load_state_dict of the embedding alone into inference tensors (a copy made under
    inference_mode), which bumps no version, so the head left the tie."""
    import copy

    from conftest import tiny_model
    from transformers import LlamaForCausalLM

    def palettized(seed):
        model = tiny_model("llama")
        torch.manual_seed(seed)
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight))
        return dkm_hf.palettize(dkm_hf.prepare(model, dkm_hf.DKMConfig(bits=3, weight_threshold=0)).eval())

    model, other = palettized(0), palettized(1)
    assert isinstance(model, LlamaForCausalLM) and model.lm_head.tied_source is model.model.embed_tokens
    with torch.inference_mode():
        model = copy.deepcopy(model)
        embedding, head = model.model.embed_tokens, model.lm_head
        assert embedding.weight_lut.is_inference()
        dkm_hf.set_inference_mode(model, "dense")
        stale = head.weight.clone()
        embedding.load_state_dict(other.model.embed_tokens.state_dict())
        assert torch.equal(embedding.weight, other.model.embed_tokens.weight)
        assert torch.equal(head.weight, embedding.weight) and not torch.equal(head.weight, stale)
