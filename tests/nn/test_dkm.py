from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import AUTO, TINY, tiny_inputs
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.nn import DKMMixin
from dkm_hf.ops import fused

ABSOLUTE = {"tau": 1e-3, "tau_scale": "absolute"}  # a fixed temperature, as the naive references use
# Weights clustered with weight_threshold=0: every parameter of >= 2 dimensions, a tied lm_head counted once more.
EXPECTED_ALL = {"bert": 17, "gpt2": 11, "llama": 16}


def _count_supported(model: nn.Module, threshold: int) -> int:
    return sum(
        1
        for name, m in model.named_modules()
        for p in m._parameters.values()
        if name and p is not None and p.dim() >= 2 and p.numel() >= threshold
    )


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("threshold", [0, 2048])
def test_replacement_count(tiny_dir, name, threshold):
    path = tiny_dir(name)
    plain = AUTO[name].from_pretrained(path)
    model = AUTO[name].from_pretrained(path, dkm_config=DKMConfig(bits=2, weight_threshold=threshold))
    replaced = dkm_hf.dkm_modules(model)
    assert len(replaced) == _count_supported(plain, threshold)
    if threshold == 0 and name in EXPECTED_ALL:
        assert len(replaced) == EXPECTED_ALL[name]
    assert all(isinstance(w.module, DKMMixin) and w.dkm_ready for _, w in replaced)
    assert all(w.has_state == (w.tied_source is None) for _, w in replaced)
    model.eval()
    with torch.no_grad():
        out = model(**tiny_inputs(name)).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tied_embeddings_clustered_once_and_stay_tied(tiny_dir, name):
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.tied_source is embed and head.weight is embed.weight
    assert "centroids" not in dict(head.named_buffers())
    model.eval()
    assert torch.equal(head.clustered_weight(), embed.clustered_weight())
    dkm_hf.palettize(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.tied_source is embed and torch.equal(head.weight, embed.weight)
    assert not any(k.startswith("lm_head") for k in model.state_dict())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("cluster_dim", [1, 2])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
def test_freeze_has_at_most_2_pow_b_values_per_group(bits, cluster_dim, granularity):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    group_size = 16 if granularity == "per_grouped_channel" else None
    config = DKMConfig(
        bits=bits, cluster_dim=cluster_dim, granularity=granularity, group_size=group_size, weight_threshold=0
    )
    model = dkm_hf.prepare(nn.Sequential(layer), config)
    weight = model[0].eval().hard_weight()
    for g in range(48 // (group_size or 48)):
        rows = weight[g * (group_size or 48) : (g + 1) * (group_size or 48)]
        vectors = rows.reshape(-1, cluster_dim)
        assert torch.unique(vectors, dim=0).shape[0] <= 2**bits


def test_conv_variants_and_embedding_via_prepare():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(50, 16),
        nn.Conv1d(16, 32, 3, padding=1),
        nn.Conv1d(32, 32, 3, groups=32),  # depthwise
        nn.Conv2d(8, 16, 3, groups=2),  # grouped
        nn.Conv3d(4, 8, 2),
        Conv1D(24, 16),
        nn.Linear(16, 8),
    )
    dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0))
    assert all(isinstance(m, DKMMixin) for m in model)
    model.eval()
    assert model[0](torch.tensor([[1, 2]])).shape == (1, 2, 16)
    assert model[1](torch.randn(1, 16, 5)).shape == (1, 32, 5)
    assert model[2](torch.randn(1, 32, 5)).shape == (1, 32, 3)
    assert model[3](torch.randn(1, 8, 5, 5)).shape == (1, 16, 3, 3)
    assert model[4](torch.randn(1, 4, 3, 3, 3)).shape == (1, 8, 2, 2, 2)
    assert model[5](torch.randn(2, 16)).shape == (2, 24)
    for m in model:
        assert torch.unique(m.clustered_weight()).numel() <= 4


def test_subclass_of_supported_type_is_clustered():
    class MyLinear(nn.Linear):
        pass

    model = dkm_hf.prepare(nn.Sequential(MyLinear(64, 64)), DKMConfig(bits=2, weight_threshold=0))
    assert isinstance(model[0], DKMMixin) and isinstance(model[0], nn.Linear)


def test_soft_in_train_hard_in_eval_and_cache():
    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(bits=2, **ABSOLUTE, weight_threshold=0))
    layer = model[0]
    model.train()
    soft = layer.clustered_weight()
    assert soft.requires_grad and torch.unique(soft.detach()).numel() > 4
    model.eval()
    with torch.no_grad():
        hard = layer.clustered_weight()
        assert torch.unique(hard).numel() <= 4
        assert layer.clustered_weight() is hard  # cached
    # with gradients on, the cached tensor in a graph that warns on backward
    assert layer.clustered_weight().data_ptr() == hard.data_ptr()
    with torch.no_grad():
        layer.weight.add_(0.01)
        assert layer.clustered_weight() is not hard  # weight changed: recomputed


def test_gradients_reach_weight_and_centroids_move():
    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(128, 64)), DKMConfig(bits=3, **ABSOLUTE, weight_threshold=0))
    layer = model[0]
    before = layer.centroids.clone()
    model.train()
    model(torch.randn(4, 128)).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.add_(layer.weight.grad, alpha=-0.1)
    model(torch.randn(4, 128)).sum().backward()
    assert not torch.equal(before, layer.centroids)


def test_activation_checkpointing_recomputes_the_same_forward():
    import copy

    torch.manual_seed(0)
    plain = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(bits=2, **ABSOLUTE, weight_threshold=0))
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(4, 64)
    plain.train()(x).square().sum().backward()
    out = torch.utils.checkpoint.checkpoint(checkpointed.train(), x, use_reentrant=False)
    out.square().sum().backward()
    assert torch.equal(plain[0].weight.grad, checkpointed[0].weight.grad)
    assert torch.equal(plain[0].centroids, checkpointed[0].centroids)


def test_hard_weight_follows_a_fused_optimizer_step():
    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(bits=2, **ABSOLUTE, weight_threshold=0))
    model.eval()
    before = model[0].clustered_weight().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)  # does not bump version counters
    model.train()
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    model.eval()
    expected = gather(model[0])
    assert not torch.equal(before, model[0].clustered_weight())
    assert torch.equal(model[0].clustered_weight(), expected)


def gather(layer):
    from dkm_hf.ops.attention import gather_centroids, hard_assign

    vectors = layer.weight.detach().reshape(1, -1, 1)
    lut = layer.centroids.half().float()  # the LUT dtype of the checkpoint
    return gather_centroids(hard_assign(vectors, layer.centroids), lut).reshape(layer.weight.shape)


def test_per_channel_scale_and_bfloat16():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight[0] *= 100  # an outlier channel
    model = dkm_hf.prepare(nn.Sequential(layer), DKMConfig(bits=3, per_channel_scale=True, weight_threshold=0))
    model.eval()
    hard = model[0].clustered_weight()
    rel = (hard - model[0].weight).norm(dim=1) / model[0].weight.norm(dim=1)
    assert rel.max() < 0.2  # every channel, the outlier one included, is reconstructed
    model = model.to(torch.bfloat16).train()
    out = model(torch.randn(2, 64, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and model[0].weight.grad.abs().sum() > 0


def test_bad_geometry_names_module_and_value():
    with pytest.raises(ValueError, match=r"cluster_dim=3 .* 0"):
        dkm_hf.prepare(nn.Sequential(nn.Linear(64, 32)), DKMConfig(cluster_dim=3, weight_threshold=0))
    with pytest.raises(ValueError, match=r"group_size=5 .* 0"):
        dkm_hf.prepare(
            nn.Sequential(nn.Linear(64, 32)),
            DKMConfig(granularity="per_grouped_channel", group_size=5, weight_threshold=0),
        )
    with pytest.raises(ValueError, match=r"overrides: pattern 'decoder'"):
        dkm_hf.prepare(nn.Sequential(nn.Linear(64, 32)), DKMConfig(overrides={"decoder": {"bits": 2}}))


def test_skips_and_warning_when_nothing_replaced(caplog):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(4, 4))
    dkm_hf.prepare(model, DKMConfig(weight_threshold=100, modules_to_not_convert=["1"]))
    assert [type(m).__name__ for m in model] == ["DKMLinear", "Linear", "Linear"]
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        dkm_hf.prepare(nn.Sequential(nn.Linear(4, 4)), DKMConfig())
    assert "no weight was selected" in caplog.text and "given to prepare itself" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a bare layer: its weight has no module name; the warning says so
        bare = dkm_hf.prepare(nn.Linear(64, 64), DKMConfig(weight_threshold=0))
    assert type(bare) is nn.Linear and "`weight` of the module given to prepare itself is left dense" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # wrapped, it would not be clustered either: no advice to wrap it
        dkm_hf.prepare(nn.Linear(4, 4), DKMConfig(weight_threshold=100))
        dkm_hf.prepare(nn.Linear(64, 64), DKMConfig(weight_threshold=0, modules_to_not_convert=["weight"]))
    assert "given to prepare itself" not in caplog.text
    layer = nn.Sequential(nn.Linear(64, 64))  # nothing selected leaves nothing behind: it can be prepared again
    dkm_hf.prepare(layer, DKMConfig(weight_threshold=10**6))
    assert dkm_hf.get_dkm_config(layer) is None and not dkm_hf.dkm_modules(layer)
    assert dkm_hf.dkm_modules(dkm_hf.prepare(layer, DKMConfig(weight_threshold=0)))
    assert type(dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64)), DKMConfig(weight_threshold=0))[0]).__name__ == (
        "DKMLinear"
    )


def test_mixed_precision_overrides(tiny_dir):
    config = DKMConfig(
        bits=4, weight_threshold=0, overrides={r".*embeddings.*": {"bits": 2}, r".*\.value": {"bits": 3}}
    )
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), dkm_config=config)
    bits = {name: m.layout.bits for name, m in dkm_hf.dkm_modules(model)}
    assert bits["bert.embeddings.word_embeddings"] == 2
    assert bits["bert.encoder.layer.1.attention.self.value"] == 3
    assert bits["bert.encoder.layer.1.attention.self.query"] == 4


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_training_checkpoint_round_trip_keeps_centroids(tiny_dir, tmp_path, name):
    config = DKMConfig(bits=3, weight_threshold=0, per_channel_scale=True)
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=config)
    model.train()
    model(**tiny_inputs(name)).logits.sum().backward()  # move the centroids away from their initial values
    model.save_pretrained(tmp_path / "train")
    loaded, info = AUTO[name].from_pretrained(tmp_path / "train", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (n, a), (_, b) in zip(dkm_hf.dkm_modules(model), dkm_hf.dkm_modules(loaded)):
        if a.tied_source is None:
            assert torch.equal(a.centroids, b.centroids) and torch.equal(a.weight_scale, b.weight_scale), n
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**tiny_inputs(name)).logits, loaded(**tiny_inputs(name)).logits)


@pytest.mark.parametrize("name", list(TINY))
def test_eval_measures_exactly_the_model_that_ships(tiny_dir, name):
    config = DKMConfig(bits=3, weight_threshold=0, per_channel_scale=name == "llama")
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=config).eval()
    with torch.no_grad():
        hard = model(**tiny_inputs(name)).logits
        packed = dkm_hf.palettize(model)(**tiny_inputs(name)).logits
        dense = dkm_hf.set_inference_mode(model, "dense")(**tiny_inputs(name)).logits
    assert torch.equal(hard, dense)  # the decoded weights are the hard weights, bit for bit
    # packed (the default) computes small batches with the fused LUT gemv and decodes per forward: float32 sums in
    # another order (a relative error of a few ulps of the largest output)
    torch.testing.assert_close(packed, hard, rtol=0, atol=1e-6 * hard.abs().max().item())


def test_gradients_equal_the_naive_reference_from_the_start_centroids():
    """The weight's gradient through a DKM layer equals naive autograd DKM from the centroids the step started from
    (the layer updates its centroid buffer after the forward; backward must not see the update)."""
    from reference import naive_dkm

    torch.manual_seed(0)
    layer = dkm_hf.prepare(nn.Sequential(nn.Linear(48, 40)), DKMConfig(bits=3, **ABSOLUTE, weight_threshold=0))[0]
    x = torch.randn(6, 48)
    start = layer.centroids.clone()
    layer.train()(x).square().sum().backward()
    assert not torch.equal(start, layer.centroids)  # the buffer moved on
    w = layer.weight.detach().clone().requires_grad_()
    soft, _ = naive_dkm(w.reshape(1, -1, 1), start, 1e-3, 3, 1e-4)
    torch.nn.functional.linear(x, soft.reshape(40, 48), layer.bias.detach()).square().sum().backward()
    assert ((layer.weight.grad - w.grad).norm() / w.grad.norm()).item() < 1e-5


def test_tied_weights_cost_one_dkm_pass_per_step(tiny_dir, monkeypatch):
    """A weight shared by two modules (Llama's tied embeddings and LM head): one DKM loop per step, both uses see
    the same soft weight, and the gradient equals a reference where the soft weight is computed once by hand."""
    from reference import naive_dkm

    from dkm_hf.nn import dkm as nn_dkm

    model = AUTO["llama"].from_pretrained(
        tiny_dir("llama"),
        dkm_config=DKMConfig(bits=3, **ABSOLUTE, weight_threshold=0, target_modules=["embed_tokens", "lm_head"]),
    )
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.tied_source is embed
    calls, seen = [], {}
    real = nn_dkm.dkm_cluster

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(nn_dkm, "dkm_cluster", counting)

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, module.clustered_weight())

        return hook

    embed.register_forward_hook(record("embed"))
    head.register_forward_hook(record("head"))
    start = embed.centroids.clone()
    inputs = tiny_inputs("llama")
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert len(calls) == 1  # one loop for the shared weight, not one per module
    # both uses see the same tensor (the head a view of it)
    assert seen["embed"].data_ptr() == seen["head"].data_ptr() and torch.equal(seen["embed"], seen["head"])
    loss.backward()
    # Reference: the soft weight computed once by hand and used by both modules of a plain model.
    reference = AUTO["llama"].from_pretrained(tiny_dir("llama")).train()
    ref_w = reference.get_input_embeddings().weight.detach().clone().requires_grad_()
    soft, _ = naive_dkm(ref_w.reshape(1, -1, 1), start, 1e-3, 3, 1e-4)
    for module in (reference.get_input_embeddings(), reference.get_output_embeddings()):
        del module.weight
        module.weight = soft.reshape(ref_w.shape)
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert ((embed.weight.grad - ref_w.grad).norm() / ref_w.grad.norm()).item() < 1e-5
    # the next step is a new pass
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert len(calls) == 2


@pytest.mark.skipif(not fused.available(torch.zeros(1, 1, 1, dtype=torch.bfloat16)), reason="no fused CPU kernel")
def test_a_bf16_layer_keeps_no_float32_copy_of_its_weight_for_backward(monkeypatch):
    """Between forward and backward the DKM loop of a bf16 layer holds the weight itself (the parameter), not a
    float32 copy, which would add 4 bytes per clustered weight (the soft weight the matmul saves is bf16 too)."""
    from dkm_hf.nn import dkm as nn_dkm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64, bias=False)).bfloat16()
    dkm_hf.prepare(model, DKMConfig(bits=4, granularity="per_grouped_channel", group_size=1, max_iters=1))
    layer = model[0]
    saved = []
    pack = nn_dkm._pack
    monkeypatch.setattr(nn_dkm, "_pack", lambda t: saved.append(t) or pack(t))
    out = layer.train()(torch.randn(8, 256, dtype=torch.bfloat16))
    large = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert len(large) == 1 and large[0].dtype == torch.bfloat16
    assert large[0].untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and layer.weight.grad.abs().sum() > 0


def test_a_geometry_error_leaves_the_model_as_it_was():
    """Every layout is worked out before any weight is converted: a weight whose geometry does not fit, late in the
    model, leaves no earlier weight clustered, and the model can be prepared again with a config that fits."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(30, 32))
    with pytest.raises(ValueError, match=r"cluster_dim=4 .* 30 features .* 2"):
        dkm_hf.prepare(model, DKMConfig(weight_threshold=0, cluster_dim=4))
    assert [type(m) for m in model] == [nn.Linear] * 3 and not dkm_hf.dkm_modules(model)
    assert all(set(dict(m.named_buffers())) == set() for m in model)
    dkm_hf.prepare(model, DKMConfig(weight_threshold=0, cluster_dim=2))
    assert len(dkm_hf.dkm_modules(model)) == 3


def test_an_all_zero_row_takes_a_typical_scale_and_trains(tiny_dir):
    """per_channel_scale: the padding token's embedding row is all zeros when the model is built; its scale is the
    other rows' mean (not the 1e-12 floor, which made the row's values ~1e7 once the tied head's gradient moved it,
    and the gradients non-finite), and three AdamW steps keep every gradient finite."""
    from conftest import tiny_lm_batches
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert model.config.pad_token_id == 0 and bool(model.model.embed_tokens.weight[0].eq(0).all())
    config = DKMConfig(
        bits=4, per_channel_scale=True, granularity="per_grouped_channel", group_size=1, weight_threshold=0
    )
    dkm_hf.prepare(model, config)
    state = dict(dkm_hf.dkm_modules(model))["model.embed_tokens"]
    scale = state.weight_scale[:, 0]
    torch.testing.assert_close(scale[0], scale[1:].mean())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for batch in tiny_lm_batches(3):
        model(**batch).loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()


def test_a_16_bit_models_centroids_keep_float32_between_steps(tiny_dir):
    """The fused loop of a bfloat16 model computes in float32 and its centroids stay float32 in their buffer (before:
    rounded to bfloat16 each step, 0.36% of the largest centroid off the chunked path's); one step of the fused and
    the chunked path agree to float32 rounding."""
    from transformers import AutoModelForCausalLM

    centroids = {}
    for implementation in ("auto", "chunked"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16)
        config = DKMConfig(bits=3, granularity="per_grouped_channel", group_size=1, weight_threshold=0,
                           implementation=implementation)  # fmt: skip
        state = dict(dkm_hf.dkm_modules(dkm_hf.prepare(model, config)))["model.layers.0.mlp.up_proj"]
        model.train()
        state.soft_weight()
        centroids[implementation] = state.centroids.detach().clone()
    fused, chunked = centroids["auto"], centroids["chunked"]
    assert not torch.equal(fused, fused.bfloat16().float())  # not bfloat16 values
    assert (fused - chunked).abs().max() <= 1e-5 * chunked.abs().max()


def _tiny_llama_dkm(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    return dkm_hf.prepare(model, DKMConfig(bits=4, weight_threshold=256))


def test_two_threads_running_one_dkm_model_agree_and_leave_nothing_behind():
    """Each clustered parameter is shadowed by an instance attribute during its module's forward: two threads running
    one model took turns restoring each other's shadows, leaving a stale copy of the hard weight in front of the
    parameter for good (the dequantized model then computed with it). Threads now take turns per module."""
    import sys
    import threading

    model = _tiny_llama_dkm(128).eval()
    inputs = [torch.randint(3, 128, (1, 4 * n)) for n in (1, 7)]
    with torch.no_grad():
        expected = [model(x).logits for x in inputs]
    results, errors = {0: [], 1: []}, []

    def work(i):
        try:
            for _ in range(60):
                with torch.no_grad():
                    results[i].append(model(inputs[i]).logits)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the window between a shadow's set and restore is hit
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    for i in (0, 1):
        assert all(torch.equal(out, expected[i]) for out in results[i])
    stale = [n for n, m in model.named_modules() if isinstance(m, DKMMixin) and "weight" in m.__dict__]
    assert stale == []


def test_a_hard_weight_made_under_inference_mode_serves_a_later_forward_with_gradients():
    """The eval-mode hard weight is cached; made under torch.inference_mode it was an inference tensor, and a later
    eval-mode forward whose input needs a gradient (saliency, prompt tuning) failed to save it for backward."""
    model = _tiny_llama_dkm().eval()
    ids = torch.randint(3, 128, (1, 8))
    with torch.inference_mode():
        reference = model(ids).logits.clone()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds).logits
    out.sum().backward()
    assert embeds.grad is not None and bool(torch.isfinite(embeds.grad).all())
    torch.testing.assert_close(out.detach(), reference)


def test_a_bf16_weight_divided_by_its_scale_is_bucketed_as_float32_values():
    """The uniquified path keyed a bf16 weight's vectors by their bf16 rounding also when they were divided by a
    per-channel scale (float32 values, no longer bf16 ones): gradients 12% off the exact path against 1.5% for a
    float32 weight. Scaled vectors take float16 buckets, as float32 weights do."""

    def step(implementation):
        torch.manual_seed(0)
        layer = nn.Linear(512, 512)  # 262,144 weights in one LUT: "auto" takes the uniquified path
        with torch.no_grad():
            layer.weight.normal_(0, 0.02).mul_(torch.rand(512, 1) * 3 + 0.1)
        layer = layer.bfloat16()
        config = DKMConfig(bits=4, weight_threshold=0, implementation=implementation, per_channel_scale=True)
        dkm_hf.prepare(nn.Sequential(layer), config)
        x = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
        layer.train()(x).float().square().sum().backward()
        return layer.weight.grad.float()

    exact, auto = step("chunked"), step("auto")
    assert ((auto - exact).norm() / exact.norm()).item() < 0.04


def test_a_child_failing_in_its_parents_scope_leaves_no_lock_held(monkeypatch):
    """A parent's scope opens each DKM child's shadow in turn; when a later child failed (out of memory, say), the
    earlier ones stayed open, their locks held until the traceback was collected, in another thread if the error
    crossed threads (a server's pool): the next forward from any other thread waited forever."""
    import concurrent.futures
    import threading

    from dkm_hf.nn.dkm import DKMWeight

    model = _tiny_llama_dkm().eval()
    attention = model.model.layers[0].self_attn
    second = attention.k_proj.dkm_weights["weight"]
    original, failed = DKMWeight.clustered_weight, []

    def flaky(self):
        if self is second and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("simulated")
        return original(self)

    monkeypatch.setattr(DKMWeight, "clustered_weight", flaky)
    ids = torch.randint(3, 128, (1, 8))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with pytest.raises(torch.OutOfMemoryError):
            pool.submit(lambda: model(ids)).result()
        done = []
        runner = threading.Thread(target=lambda: done.append(model(ids).logits.shape), daemon=True)
        runner.start()
        runner.join(timeout=60)
    assert done == [(1, 8, 128)] and "weight" not in attention.q_proj.__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_constant_weight_gets_the_gradient_of_its_mean(dtype):
    """A LUT group of equal weights has no variance: tau fell to its 1e-26 floor and 2 / tau multiplied float rounding
    into the gradients (1e11 for bf16, inf for fp16). The floor is relative to the centroids' size; every weight's
    gradient is then what moving all of them moves: the mean of the upstream gradients through the layer."""
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.3)
    layer = layer.to(dtype)
    dkm_hf.prepare(nn.Sequential(layer), DKMConfig(bits=4, weight_threshold=0))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer.train()(x).float().sum().backward()
    grad = layer.weight.grad.float()
    exact = x.float().sum(0).mean()  # d/dw of sum(x @ (w 1)^T) spread evenly: each weight moves with the centroid
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, torch.full_like(grad, exact.item()), rtol=0.05, atol=0.05)


def test_centroids_from_load_state_dict_are_used_as_they_are():
    """A model prepared without initialisation that loads a trained model's state (its centroids) uses them: no
    k-means at its first forward replaces them."""
    config = DKMConfig(bits=3, weight_threshold=0)
    torch.manual_seed(0)
    trained = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 48)), config)
    trained(torch.randn(4, 64)).square().sum().backward()  # a training forward: the centroids leave k-means'
    torch.manual_seed(1)
    fresh = dkm_hf.prepare(nn.Sequential(nn.Linear(64, 48)), config, init=False)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))
    assert torch.equal(fresh[0].centroids, trained[0].centroids)


def test_epsilon_is_in_units_of_each_groups_standard_deviation():
    """The early stop compares each centroid move with epsilon times the group's standard deviation (tau is relative
    to its variance): the same layer scaled by 8 (exactly, a power of two) stops at the same iteration, with
    centroids 8 times as large. A stop in units of the variance would stop the scaled layer at another one."""
    torch.manual_seed(0)
    layer, x = nn.Linear(256, 64), torch.randn(2, 256)

    def centroids(scale, epsilon=0.05, max_iters=6):
        model = copy.deepcopy(nn.Sequential(layer))
        with torch.no_grad():
            model[0].weight.mul_(scale)
        config = DKMConfig(bits=3, weight_threshold=0, max_iters=max_iters, epsilon=epsilon)
        model = dkm_hf.init_centroids(dkm_hf.prepare(model, config, init=False))
        with torch.no_grad():
            model[0].centroids.mul_(1.05)  # off the optimum: the loop moves them
        model(x).sum().backward()
        return model[0].centroids / scale

    stopped = centroids(1.0)
    # the stop falls between the first and the last iteration, where the scale could move it
    assert not torch.equal(stopped, centroids(1.0, max_iters=1))
    assert not torch.equal(stopped, centroids(1.0, epsilon=1e-30))
    torch.testing.assert_close(centroids(8.0), stopped, rtol=1e-5, atol=0)


@pytest.mark.parametrize("implementation", ["chunked", "fused"])
def test_a_training_forward_without_backward_leaves_nothing_behind(implementation):
    """A training forward whose backward never runs (an error between them, a skipped step, a loss looked at):
    the fused op's saved outputs held its own node (a cycle in C++ that only backward breaks), and the soft weight's
    release hook held the weight's state (a cycle through the graph that gc cannot see), so each such forward left
    its graph behind and a dropped model its tensors."""
    import gc
    import weakref

    if implementation == "fused" and fused.cpu_kernels() is None:
        pytest.skip("the fused CPU kernel could not be built")

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    def model() -> nn.Module:
        torch.manual_seed(0)
        config = DKMConfig(bits=3, weight_threshold=0, implementation=implementation)
        return dkm_hf.prepare(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), config).train()

    x = torch.randn(4, 64)
    kept = model()
    kept(x).sum().backward()
    kept.train()
    start = tensors()
    for _ in range(3):
        kept(x).square().mean()  # no backward
        kept.train()  # drops the cached soft weights
    dropped = model()
    dropped(x).sum()
    weight = weakref.ref(dropped[0].weight)
    del dropped
    assert tensors() == start and weight() is None
