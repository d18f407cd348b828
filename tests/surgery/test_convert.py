"""Module swaps: accelerate hooks move with the module, ties stay one tensor, conversions keep the model's output."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from conftest import AUTO, tiny_inputs, tiny_model
from torch import nn
from transformers.utils import logging as hf_logging

import dkm_hf
from dkm_hf import DKMConfig


class CountingHook(ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_a_module_with_an_accelerate_hook_is_clustered_and_keeps_its_hook():
    """12.4: the hook's instance-level forward must not be copied onto the DKM module (it would run the dense
    weight of the old module)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    hook = CountingHook()
    add_hook_to_module(model[0], hook)
    dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0))
    layer = model[0]
    assert isinstance(layer, dkm_hf.DKMMixin) and layer._hf_hook is hook
    x = torch.randn(3, 32)
    out = model.eval()[0](x)
    assert hook.calls == 1
    torch.testing.assert_close(out, nn.functional.linear(x, layer.hard_weight(), layer.bias))
    assert torch.unique(layer.hard_weight()).numel() <= 4
    dkm_hf.palettize(model)
    assert model[0]._hf_hook is hook and torch.equal(model[0](x), out) and hook.calls == 2


def test_offloaded_modules_are_refused_with_their_name():
    model = nn.Sequential(nn.Linear(32, 32))
    add_hook_to_module(model[0], AlignDevicesHook(execution_device="cpu", offload=True))
    with pytest.raises(ValueError, match=r"cannot convert 0: accelerate offloads its weights"):
        dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0))


def test_device_map_load_clusters(tiny_dir):
    """12.4: from_pretrained(..., device_map="cpu", dkm_config=...) trains the soft weight, not the dense one."""
    model = AUTO["llama"].from_pretrained(
        tiny_dir("llama"), device_map="cpu", dkm_config=DKMConfig(bits=2, weight_threshold=0)
    )
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, dkm_hf.DKMMixin)
    model.eval()
    assert torch.unique(layer.clustered_weight()).numel() <= 4
    with torch.no_grad():
        hard = model(**tiny_inputs("llama")).logits
    assert torch.equal(dkm_hf.palettize(model)(**tiny_inputs("llama")).logits, hard)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_conversions_keep_ties_as_one_tensor(tiny_dir, name):
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=DKMConfig(bits=3, weight_threshold=0)).eval()
    with torch.no_grad():
        hard = model(**tiny_inputs(name)).logits
    dkm_hf.set_inference_mode(dkm_hf.palettize(model), "dense")  # decoded once: one tensor for both modules
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.tied_source is embed and head.weight.data_ptr() == embed.weight.data_ptr()
    dkm_hf.dequantize(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head) is nn.Linear and head.weight is embed.weight
    with torch.no_grad():
        assert torch.equal(model(**tiny_inputs(name)).logits, hard)


def test_batched_kmeans_gives_each_module_its_own_centroids():
    """`kmeans_all(model)` clusters the modules of one LUT size in batched calls; each module gets exactly what
    its own `init_centroids` gives it (per-row LUTs, per-channel scales, an 8-bit per-tensor override)."""
    from dkm_hf.surgery.convert import kmeans_all, to_dkm

    model = tiny_model("llama")
    config = DKMConfig(
        bits=3,
        granularity="per_grouped_channel",
        group_size=1,
        per_channel_scale=True,
        kmeans_restarts=2,
        weight_threshold=0,
        overrides={".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
    )
    modules = to_dkm(model, config)
    kmeans_all(model)
    owners = {name: m for name, m in modules.items() if m.tied_source is None}
    batched = {name: (m.centroids.clone(), m.weight_scale.clone()) for name, m in owners.items()}
    assert len(batched) > 10
    for name, (centroids, scale) in batched.items():
        modules[name].drop_state()
        modules[name].init_centroids()
        assert torch.equal(modules[name].centroids, centroids), name
        assert torch.equal(modules[name].weight_scale, scale), name


def test_palettize_warns_when_a_float16_lut_cannot_hold_its_centroids(caplog):
    """A layer whose weights are ~1e-7 gets a float16 LUT of subnormals and zeros (its output then zero): palettize
    warns, naming the weight and the ways out; weights of ordinary size, and a bfloat16 LUT, are not warned."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    cases = [(1e-7, "float16", False, True), (1e-2, "float16", False, False), (1e-7, "bfloat16", False, False)]
    # per-channel scales of ~1e-7 underflow a float16 LUT as well (before: no warning, 23% error, zero rows at 1e-8)
    cases += [(1e-7, "float16", True, True), (1e-2, "float16", True, False), (1e-7, "float32", True, False)]
    for scale, lut_dtype, per_channel_scale, warned in cases:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
        with torch.no_grad():
            net[0].weight.mul_(scale)
        config = dkm_hf.DKMConfig(weight_threshold=0, lut_dtype=lut_dtype, per_channel_scale=per_channel_scale)
        dkm_hf.prepare(net, config)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dkm_hf.palettize(net)
        what = "per-channel scales below" if per_channel_scale else "below the LUT dtype's normal range"
        assert (what in caplog.text and "['0']" in caplog.text) == warned, (scale, lut_dtype, per_channel_scale)


def test_a_non_finite_weight_is_refused_by_name_before_anything_converts():
    """One inf in a weight made k-means return inf for every centroid of its LUT, silently: prepare() succeeded and
    the whole hard layer was non-finite."""
    from dkm_hf.ops.kmeans import kmeans_init

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with torch.no_grad():
        model[1].weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"^1: 1 value\(s\) of the weight are NaN or infinite"):
        dkm_hf.prepare(model, DKMConfig(bits=4, weight_threshold=0))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear and not hasattr(model, "dkm_config")
    w = torch.randn(1, 5000, 1)
    w[0, 7] = float("nan")
    with pytest.raises(ValueError, match="weight 0 has non-finite values"):
        kmeans_init(w, 4)
    # an inf in a float16 weight is what a cast of a larger float32 value gives: the message says so
    model[1].weight.data = model[1].weight.data.clamp(-1, 1)
    model[1].weight.data[2, 2] = 7e4
    with pytest.raises(ValueError, match=r"^1: 1 value\(s\) .* infinite \(a float16 weight: values beyond"):
        dkm_hf.prepare(model.half(), DKMConfig(bits=4, weight_threshold=0))


@pytest.mark.parametrize(
    "scale, lut_dtype, refused",
    [(1e6, "float16", "beyond the LUT dtype's range \\(float16: \\+-65504\\)"), (1e6, "bfloat16", None),
     (1e6, "float32", None), (1e20, "float32", "could overflow above"), (1e3, "float16", None)],
)  # fmt: skip
def test_values_beyond_the_lut_dtype_or_float32_distances_are_refused_by_name(scale, lut_dtype, refused):
    """Weights above float16's range took a float16 LUT of inf: prepare and training succeeded, the model in eval
    mode and the palettized model gave inf / NaN, silently. Weights whose squared distances overflow float32 gave
    NaN gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    config = DKMConfig(bits=4, weight_threshold=0, lut_dtype=lut_dtype)
    if refused:
        with pytest.raises(ValueError, match=f"^1: values up to .*{refused}"):
            dkm_hf.prepare(model, config)
        assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear and not hasattr(model, "dkm_config")
        return
    dkm_hf.prepare(model, config)
    x = torch.randn(4, 64)
    model.train()
    model(x).sum().backward()
    assert torch.isfinite(model[1].weight.grad).all()
    dkm_hf.palettize(model)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("tau_scale, tau", [("variance", 1e-39), ("variance", 1e-45), ("absolute", 1e-40)])
def test_a_tau_below_float32s_range_gives_finite_gradients(tau_scale, tau):
    """tau below float32's normal range (given, or tau times a small variance) made 1 / tau infinite: NaN gradients.
    The loop's tau has a floor (1e-30) where the softmax is an argmin anyway: the gradients are those of tau 1e-30."""
    torch.manual_seed(0)
    grads = []
    for t in (tau, 1e-30):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64))
        dkm_hf.prepare(model, DKMConfig(bits=4, weight_threshold=0, tau=t, tau_scale=tau_scale))
        model.train()
        model(torch.ones(4, 64)).sum().backward()
        grads.append(model[0].weight.grad)
    assert torch.isfinite(grads[0]).all()
    if tau_scale == "absolute":
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


PER_ROW = {"granularity": "per_grouped_channel", "group_size": 1}


@pytest.mark.parametrize("config", [{"bits": 3}, {"bits": 4, **PER_ROW}, {"bits": 2, "cluster_dim": 2, **PER_ROW}])
def test_palettizing_assigns_and_packs_a_slice_at_a_time(monkeypatch, config):
    """A weight's indices are never formed whole as int64 (8 bytes a weight and as many again per packing step: a
    saved 33.5M-weight embedding took 800 MB more than the model at save time): hard_assign sees at most a slice of
    vectors, and the packed bytes are those of packing every index at once."""
    from dkm_hf.ops import attention, packing
    from dkm_hf.surgery.convert import to_palettized

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(62, 37, bias=False), nn.Embedding(45, 22))
    dkm_hf.prepare(net, DKMConfig(weight_threshold=0, **config))
    states = [state for _, state in dkm_hf.nn.dkm.dkm_modules(net)]
    expected = [packing.pack_indices(state.assignments(), state.layout.bits) for state in states]
    seen, hard_assign = [], attention.hard_assign

    def counted(w, c):
        seen.append(w.shape[0] * w.shape[1])
        return hard_assign(w, c)

    monkeypatch.setattr(attention, "ASSIGN_SLICE", 40)
    monkeypatch.setattr(attention, "hard_assign", counted)
    palettized = to_palettized(net)
    assert 0 < max(seen) <= 40 and len(seen) > len(states)
    for weight, packed in zip(palettized.values(), expected):
        assert torch.equal(weight.weight_indices, packed)


PER_ROW_2BIT_ALL = {"bits": 2, "granularity": "per_grouped_channel", "group_size": 1, "weight_threshold": 0}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))


def test_dequantizing_before_the_milestone_keeps_the_dense_weight():
    """A DKM weight whose clustering is off (before the milestone) computes with its dense weight; dequantize keeps
    that weight, not its hard-clustered one. A frozen weight stays frozen."""
    model = dkm_hf.prepare(_model(), DKMConfig(**PER_ROW_2BIT_ALL))
    states = dict(dkm_hf.dkm_modules(model))
    states["0"].dkm_enabled = False
    states["1"].weight.requires_grad_(False)
    dense, hard = states["0"].weight.detach().clone(), states["1"].hard_weight().detach().clone()
    assert not torch.equal(dense, states["0"].hard_weight())
    plain = dkm_hf.dequantize(model)
    assert torch.equal(plain[0].weight.detach(), dense) and plain[0].weight.requires_grad
    assert torch.equal(plain[1].weight.detach(), hard) and not plain[1].weight.requires_grad


def test_an_all_zero_lut_group_is_not_warned_as_lost_precision(caplog):
    """A row of zeros has a LUT of zeros, which float16 stores exactly: no warning about centroids below its normal
    range (that warning is for LUTs whose every centroid is a subnormal)."""
    model = _model()
    with torch.no_grad():
        model[0].weight[3] = 0.0
    dkm_hf.prepare(model, DKMConfig(**PER_ROW_2BIT_ALL))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            dkm_hf.palettize(model)
    finally:
        hf_logging.disable_propagation()
    assert "below the LUT dtype's normal range" not in caplog.text
