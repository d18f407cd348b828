"""Importance-weighted k-means initialisation: `gradient_importance` (the squared gradients of the dense model) and
`init_centroids(model, importance=...)`."""

from __future__ import annotations

import pytest
import torch
from conftest import AUTO, PER_ROW_2BIT, tiny_lm_batches

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.ops.kmeans import kmeans_init


def test_gradient_importance_is_the_dense_models_summed_squared_gradients(tiny_dir):
    """Equal to the sum of squared gradients of the same model without DKM (the same kernels in the same order);
    the model's mode, clustering, requires_grad and .grad are as they were."""
    path = tiny_dir("llama")
    model = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
    model.train()
    norm = dict(model.named_parameters())["model.norm.weight"]
    norm.requires_grad_(False)
    marker = torch.ones_like(norm)
    norm.grad = marker
    importance = dkm_hf.gradient_importance(model, tiny_lm_batches())

    dense = AUTO["llama"].from_pretrained(path).eval()
    expected = {}
    for batch in tiny_lm_batches():
        dense.zero_grad()
        dense(**batch).loss.backward()
        for name, p in dense.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad.square()
    names = [name for name, state in dkm_hf.dkm_modules(model) if state.tied_source is None]
    assert sorted(importance) == sorted(names) and "model.embed_tokens" in names and "lm_head" not in names
    for name in names:
        torch.testing.assert_close(importance[name], expected[f"{name}.weight"], rtol=0, atol=0)
        assert importance[name].abs().sum() > 0, name
    assert model.training and not norm.requires_grad and norm.grad is marker
    assert all(state.dkm_enabled for _, state in dkm_hf.dkm_modules(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")


def test_init_centroids_with_importance(tiny_dir):
    """Each weight's centroids are its importance-weighted k-means (what `kmeans_init` gives its vectors); weights
    without an entry keep the plain k-means of loading; a tied weight's entry serves its source; an unknown name is
    refused before anything changes."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    states = dict(dkm_hf.dkm_modules(model))
    plain = {name: s.centroids.clone() for name, s in states.items() if s.tied_source is None}
    importance = dkm_hf.gradient_importance(model, tiny_lm_batches())
    with pytest.raises(ValueError, match="not DKM-clustered"):
        dkm_hf.init_centroids(model, {"model.layers.0.nonexistent": importance["model.embed_tokens"]})
    assert all(torch.equal(states[n].centroids, c) for n, c in plain.items())

    chosen = {"model.layers.0.mlp.down_proj": importance["model.layers.0.mlp.down_proj"]}
    chosen["lm_head"] = importance["model.embed_tokens"]  # the tied LM head stands for the embedding
    assert dkm_hf.init_centroids(model, chosen) is model
    for name in ("model.layers.0.mlp.down_proj", "model.embed_tokens"):
        state = states[name]
        f = importance[name]
        expected = kmeans_init(
            state.vectors(), 4, seed=state.dkm_seed, restarts=2, importance=state.importance_vectors(f)
        )
        assert torch.equal(state.centroids, expected), name
        assert not torch.equal(state.centroids, plain[name]), name
        # the weighted objective sum f (w - hard w)^2 is what the importance lowers
        error = lambda: (f * (state.weight - state.hard_weight()).square()).sum()  # noqa: E731
        ours = error()
        state.set_centroids(plain[name])
        assert ours < error(), name
        state.set_centroids(expected)
    assert torch.equal(states["model.layers.1.mlp.down_proj"].centroids, plain["model.layers.1.mlp.down_proj"])


def test_importance_bad_input(tiny_dir):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    with pytest.raises(ValueError, match="returned no loss"):
        dkm_hf.gradient_importance(model, [{"input_ids": tiny_lm_batches(1)[0]["input_ids"]}])
    assert all(state.dkm_enabled for _, state in dkm_hf.dkm_modules(model))  # restored after the error
    with pytest.raises(ValueError, match="gave no batch"):
        dkm_hf.gradient_importance(model, [])
    with pytest.raises(ValueError, match=r"down_proj'\] is \(3, 3\), not the weight's"):
        dkm_hf.init_centroids(model, {"model.layers.0.mlp.down_proj": torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"set_importance\(\) needs a model with DKM modules"):
        dkm_hf.set_importance(torch.nn.Linear(4, 4), {})


def test_prepared_and_weighted_under_inference_mode_then_trained(tiny_dir):
    """Preparing, weighing and measuring the importance inside torch.inference_mode leave normal tensors: training
    afterwards works and equals the same steps prepared outside it."""
    batches = tiny_lm_batches(2)
    models = []
    for inside in (False, True):
        model = AUTO["llama"].from_pretrained(tiny_dir("llama"))
        with torch.inference_mode(inside):
            dkm_hf.prepare(model, DKMConfig(**PER_ROW_2BIT))
            importance = dkm_hf.gradient_importance(model, batches)
            dkm_hf.set_importance(model, importance)
        model.train()
        model(**batches[0]).loss.backward()
        models.append(model)
    (_, a), (_, b) = dkm_hf.dkm_modules(models[0])[0], dkm_hf.dkm_modules(models[1])[0]
    assert not b.centroids.is_inference() and not b.importance.is_inference()
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.weight.grad, b.weight.grad)


def test_importance_of_the_wrong_layout_or_not_finite_is_refused_before_anything_changes(tiny_dir):
    """The weight's own shape only (a transpose or a flat copy has the right count and the wrong layout: it was
    reshaped onto the weight), finite values only (inf made the next training forward nan for good), a tensor: each
    refused by name, before any weight's centroids or loop weights change."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    states = dict(dkm_hf.dkm_modules(model))
    names = sorted(name for name, state in states.items() if state.tied_source is None)
    good = {name: torch.rand(states[name].weight.shape) + 0.1 for name in names}
    dkm_hf.set_importance(model, good)
    loops = {name: states[name].importance.clone() for name in names}
    centroids = {name: states[name].centroids.clone() for name in names}
    last = names[-1]
    weight = good[last]
    for bad, message in (
        (weight.t(), r"is \(\d+, \d+\), not the weight's"),
        (weight.flatten(), r"is \(\d+,\), not the weight's"),
        (torch.where(weight > 0.5, float("inf"), weight), "has non-finite"),
        (torch.where(weight > 0.5, float("nan"), weight), "has non-finite"),
        (weight.tolist(), "is a list, not a tensor"),
    ):
        for call in (dkm_hf.set_importance, dkm_hf.init_centroids):
            with pytest.raises(ValueError, match=f"importance\\['{last}'\\] {message}"):
                call(model, {**good, last: bad})  # the bad entry last: every other one checked and valid
            assert all(torch.equal(states[n].importance, loops[n]) for n in names)
            assert all(torch.equal(states[n].centroids, centroids[n]) for n in names)
    dense = AUTO["llama"].from_pretrained(tiny_dir("llama"))
    with pytest.raises(ValueError, match="no DKM-clustered weight"):
        dkm_hf.gradient_importance(dense, tiny_lm_batches(1))
    with pytest.raises(ValueError, match="needs a model with DKM modules"):
        dkm_hf.init_centroids(dense)


def test_set_importance_weighs_the_dkm_loop(tiny_dir):
    """The named weights' loop takes the sample weights of their importance (the soft weight and the carried
    centroids are dkm_cluster's with that importance); the others run the plain loop; a tied name serves its
    source; `None` clears; bad input changes nothing."""
    from dkm_hf.ops.dkm import dkm_cluster
    from dkm_hf.ops.kmeans import sample_weights

    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    importance = dkm_hf.gradient_importance(model, tiny_lm_batches())
    states = dict(dkm_hf.dkm_modules(model))
    name = "model.layers.0.mlp.down_proj"
    assert dkm_hf.set_importance(model, {name: importance[name], "lm_head": importance["model.embed_tokens"]}) is model
    state = states[name]
    f = sample_weights(state.importance_vectors(importance[name]).sum(-1))
    assert torch.equal(state.importance, f) and states["model.embed_tokens"].importance is not None
    assert states["model.layers.1.mlp.down_proj"].importance is None

    model.train()
    c0 = state.centroids.clone()
    vectors = state.vectors()
    tau, epsilon = state.temperature(vectors)
    implementation = state.implementation  # the fused kernel's weighted loop where it is built, else the chunked
    expected, c_next = dkm_cluster(vectors, c0, tau, state.settings.max_iters, epsilon, implementation, importance=f)
    soft = state.soft_weight()
    torch.testing.assert_close(soft, state.layout.weight_from_vectors(expected), rtol=0, atol=0)
    assert torch.equal(state.centroids, c_next)  # the weighted update is carried to the next step
    soft.sum().backward()
    assert state.weight.grad is not None and torch.isfinite(state.weight.grad).all()

    with pytest.raises(ValueError, match="not DKM-clustered"):
        dkm_hf.set_importance(model, {"nope": importance[name]})
    with pytest.raises(ValueError, match=r"is \(2, 2\), not the weight.s"):
        dkm_hf.set_importance(model, {name: torch.ones(2, 2)})
    assert torch.equal(state.importance, f)  # unchanged by the refused calls
    dkm_hf.set_importance(model, None)
    assert all(s.importance is None for s in states.values())


def test_weighted_initialisation_without_a_plain_kmeans_first(tiny_dir):
    """The documented flow: a dense model prepared with init=False has no centroids yet, `gradient_importance` runs on
    it, and the weighted `init_centroids` gives the centroids the same model loaded with dkm_config= (a plain k-means
    at load, then replaced) gets; its importance is that model's too."""
    path = tiny_dir("llama")
    loaded = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(**PER_ROW_2BIT))
    prepared = dkm_hf.prepare(AUTO["llama"].from_pretrained(path), DKMConfig(**PER_ROW_2BIT), init=False)
    assert not any(state.dkm_ready for _, state in dkm_hf.dkm_modules(prepared) if state.tied_source is None)
    importance = dkm_hf.gradient_importance(prepared, tiny_lm_batches())
    expected = dkm_hf.gradient_importance(loaded, tiny_lm_batches())
    assert sorted(importance) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(importance[name], expected[name], rtol=0, atol=0)
    dkm_hf.init_centroids(prepared, importance)
    dkm_hf.init_centroids(loaded, expected)
    states = dict(dkm_hf.dkm_modules(loaded))
    for name, state in dkm_hf.dkm_modules(prepared):
        assert state.dkm_ready, name
        if state.tied_source is not None:
            continue
        torch.testing.assert_close(state.centroids, states[name].centroids, rtol=0, atol=0)
    ids = tiny_lm_batches(1)[0]["input_ids"]
    torch.testing.assert_close(prepared.eval()(ids).logits, loaded.eval()(ids).logits, rtol=0, atol=0)


def test_set_importances_sample_weights_follow_the_model_to_another_device(tiny_dir):
    """The sample weights were a plain attribute that `model.to(...)` left behind: importance set on the CPU model
    stayed there when the trainer moved it to a GPU (a host-to-device copy in every forward, and a device mismatch
    in re-seeding). The meta device stands in for the GPU."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(**PER_ROW_2BIT))
    name = "model.layers.0.mlp.down_proj"
    dkm_hf.set_importance(model, {name: dkm_hf.gradient_importance(model, tiny_lm_batches())[name]})
    state = dict(dkm_hf.dkm_modules(model))[name]
    model.to("meta")
    assert state.importance.device.type == "meta" and state.importance.dtype == torch.float32
