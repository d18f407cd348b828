"""Bit widths per weight within the size of one width for all: `allocate_bits`."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import AUTO, tiny_lm_batches

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.surgery.allocation import _spend, sensitivities

PER_ROW_3BIT = {"bits": 3, "granularity": "per_grouped_channel", "group_size": 1, "weight_threshold": 0}
EMBEDDING_8BIT = {".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}}


def _prepared(path, config):
    return dkm_hf.prepare(AUTO["llama"].from_pretrained(path), config, init=False)


def _size(model) -> int:
    """Bytes of the clustered weights' indices and LUTs, each weight that owns them once."""
    return sum(
        s.layout.packed_bytes + math.prod(s.layout.lut_shape) * s.settings.lut_torch_dtype.itemsize
        for _, s in dkm_hf.dkm_modules(model)
        if s.tied_source is None
    )


@pytest.fixture
def allocated(tiny_dir):
    path = tiny_dir("llama")
    config = DKMConfig(**PER_ROW_3BIT, overrides=EMBEDDING_8BIT)
    model = _prepared(path, config)
    importance = dkm_hf.gradient_importance(model, tiny_lm_batches(3))
    return path, config, model, importance, dkm_hf.allocate_bits(model, importance, choices=(2, 3, 4))


def test_widths_fit_the_size_of_the_uniform_width_and_lower_the_summed_sensitivity(allocated):
    path, config, model, importance, mixed = allocated
    changed = {p: o["bits"] for p, o in mixed.overrides.items() if p not in config.overrides}
    assert changed and set(changed.values()) <= {2, 4} and {2, 4} <= set(changed.values())
    assert mixed.overrides[".*embed_tokens"] == EMBEDDING_8BIT[".*embed_tokens"]  # an override's width is kept
    remade = _prepared(path, mixed)
    widths = {n: s.layout.bits for n, s in dkm_hf.dkm_modules(remade)}
    assert widths["model.embed_tokens"] == 8 and all(widths[n] == b for n, b in changed.items())
    assert _size(remade) <= _size(model)
    free = {n: (s, importance[n]) for n, s in dkm_hf.dkm_modules(model) if s.layout.bits == 3 and not s.tied_source}
    table = sensitivities(free, [2, 3, 4])
    assert sum(table[n][widths[n]] for n in free) < sum(table[n][3] for n in free)
    assert all(table[n][2] >= table[n][3] >= table[n][4] for n in free)  # a wider LUT never fits worse here


def test_a_sensitivity_is_what_the_weighted_initialisation_of_that_width_leaves(allocated):
    """s(W, b) = sum F (W - hard W)^2 with the centroids `init_centroids(model, importance)` gives at width b."""
    path, config, model, importance, _ = allocated
    name = "model.layers.1.mlp.down_proj"
    table = sensitivities({name: (dict(dkm_hf.dkm_modules(model))[name], importance[name])}, [2, 4])
    for bits in (2, 4):
        other = _prepared(path, DKMConfig(**{**PER_ROW_3BIT, "bits": bits}, overrides=EMBEDDING_8BIT))
        dkm_hf.init_centroids(other, importance)
        state = dict(dkm_hf.dkm_modules(other))[name]
        expected = (importance[name] * (state.weight - state.hard_weight()).square()).sum().item()
        assert table[name][bits] == pytest.approx(expected, rel=1e-6)


def test_the_allocated_model_trains_and_palettizes(allocated, tmp_path):
    path, _, _, importance, mixed = allocated
    model = dkm_hf.init_centroids(_prepared(path, mixed), importance)
    dkm_hf.set_importance(model, {n: f for n, f in importance.items() if n != "model.embed_tokens"})
    batch = tiny_lm_batches(1)[0]
    model.train()
    model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    dkm_hf.palettize(model).save_pretrained(tmp_path / "mixed")
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "mixed")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert reloaded.config.quantization_config.overrides == mixed.overrides


def test_widths_no_wider_than_the_budget_fill_it_and_bad_input_is_refused(allocated, tiny_dir):
    _, config, model, importance, _ = allocated
    assert dkm_hf.allocate_bits(model, importance, choices=(3,)).overrides == config.overrides
    narrow = dkm_hf.allocate_bits(model, importance, choices=(1, 2))  # all fit: each takes the better, 2 bits
    assert {o["bits"] for p, o in narrow.overrides.items() if p not in config.overrides} == {2}
    with pytest.raises(ValueError, match=r"choices must be bit widths in \[1, 8\], but got 9"):
        dkm_hf.allocate_bits(model, importance, choices=(3, 9))
    with pytest.raises(ValueError, match="no width to choose from"):
        dkm_hf.allocate_bits(model, importance, choices=())
    with pytest.raises(ValueError, match="even the narrowest of \\[4, 5\\] is larger than 3 bits"):
        dkm_hf.allocate_bits(model, importance, choices=(4, 5))
    with pytest.raises(ValueError, match="needs a model prepared for DKM"):
        dkm_hf.allocate_bits(AUTO["llama"].from_pretrained(tiny_dir("llama")), importance, choices=(2, 3))
    with pytest.raises(ValueError, match="not DKM-clustered"):
        dkm_hf.allocate_bits(model, {"nothing": torch.ones(1)}, choices=(2, 3))
    with pytest.raises(ValueError, match="no weight of the default width 3"):
        dkm_hf.allocate_bits(model, {"model.embed_tokens": importance["model.embed_tokens"]}, choices=(2, 3))


def test_the_bytes_the_lagrangian_solution_leaves_are_spent(allocated):
    """Widths 2 or 4 at the size of 3 bits: the Lagrangian solution alone can leave much of the size unspent; what
    is left afterwards is less than any one widening would need."""
    path, config, model, importance, _ = allocated
    mixed = dkm_hf.allocate_bits(model, importance, choices=(2, 4))
    remade = _prepared(path, mixed)
    states = {n: s for n, s in dkm_hf.dkm_modules(remade) if s.layout.bits in (2, 4) and not s.tied_source}
    left = _size(model) - _size(remade)
    narrow = [s for s in states.values() if s.layout.bits == 2]
    assert 0 <= left and narrow
    widening = [
        s.layout.packed_bytes * 2 + (16 - 4) * s.layout.groups * s.settings.lut_torch_dtype.itemsize for s in narrow
    ]  # 2 -> 4 bits: twice the index bytes, 12 more LUT entries per group
    assert left < min(widening)


def test_names_that_end_other_names_tied_weights_and_scales(tiny_dir):
    """A weight named "0" next to "1.0": its override names it alone. A tied weight whose side has an override of
    its own gets its source's width. The model's per-channel scales are left as they are."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    )
    config = DKMConfig(**PER_ROW_3BIT, per_channel_scale=True)
    dense = copy.deepcopy(model)
    dkm_hf.prepare(model, config)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # moved since initialisation, as in training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 16)
    importance = dkm_hf.gradient_importance(model, [x], loss_fn=lambda m, b: m(b).square().mean())
    del importance["1.0"]
    mixed = dkm_hf.allocate_bits(model, importance, choices=(4,), budget_bits=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "(?:0)" in mixed.overrides and "0" not in mixed.overrides and "1.1" in mixed.overrides
    remade = dkm_hf.prepare(dense, mixed)
    assert {n: s.layout.bits for n, s in dkm_hf.dkm_modules(remade)} == {"0": 4, "1.0": 3, "1.1": 4}

    tied = DKMConfig(
        **PER_ROW_3BIT,
        overrides={".*embed_tokens": {"granularity": "per_tensor"}, "lm_head": {"granularity": "per_tensor"}},
    )
    llama = _prepared(tiny_dir("llama"), tied)
    importance = dkm_hf.gradient_importance(llama, tiny_lm_batches(1))
    mixed = dkm_hf.allocate_bits(llama, importance, choices=(4,), budget_bits=4)
    widths = {n: s.layout.bits for n, s in dkm_hf.dkm_modules(_prepared(tiny_dir("llama"), mixed))}
    assert widths["model.embed_tokens"] == widths["lm_head"] == 4 and set(widths.values()) == {4}


def test_choices_that_are_not_widths_and_a_palettized_model_are_refused(allocated):
    _, _, model, importance, _ = allocated
    for choices in (3, "34", (2, "3"), (2, True)):
        with pytest.raises(ValueError, match=r"choices must be bit widths such as \(2, 3, 4\)"):
            dkm_hf.allocate_bits(model, importance, choices=choices)
    with pytest.raises(ValueError, match="not a dense or palettized one"):
        dkm_hf.allocate_bits(dkm_hf.palettize(model), importance, choices=(2, 3))


def test_a_tied_pair_follows_its_source_without_an_override_of_its_own(tiny_dir):
    """An embedding with settings of its own (per_tensor) tied to lm_head, which no override matches alone: an
    override written under lm_head's name gave it the defaults' granularity, and preparing with the result was
    refused. Generators and NumPy integers are widths too."""
    config = DKMConfig(**PER_ROW_3BIT, overrides={".*embed_tokens": {"granularity": "per_tensor", "group_size": None}})
    llama = _prepared(tiny_dir("llama"), config)
    importance = dkm_hf.gradient_importance(llama, tiny_lm_batches(2))
    mixed = dkm_hf.allocate_bits(llama, importance, choices=(b for b in (2, 3, 4)))
    assert "lm_head" not in mixed.overrides and "model.embed_tokens" in mixed.overrides  # the source moved
    states = dict(dkm_hf.dkm_modules(_prepared(tiny_dir("llama"), mixed)))
    assert states["lm_head"].tied_source is states["model.embed_tokens"]
    assert states["model.embed_tokens"].layout.bits == mixed.overrides["model.embed_tokens"]["bits"] != 3
    assert dkm_hf.allocate_bits(llama, importance, choices=np.array([4, 2, 3])).overrides == mixed.overrides


def test_an_importance_of_zeros_or_below_and_names_that_are_no_regex(allocated):
    """An importance zero everywhere (no gradient reached the weights) put every weight at the narrowest width,
    silently; a negative one was taken. A module name that is no regex ("w[") gave an override prepare refused."""
    _, _, model, importance, _ = allocated
    with pytest.raises(ValueError, match="the importance is zero for every weight"):
        dkm_hf.allocate_bits(model, {n: torch.zeros_like(f) for n, f in importance.items()}, choices=(2, 3, 4))
    with pytest.raises(ValueError, match="has negative values"):
        dkm_hf.allocate_bits(model, {n: -f for n, f in importance.items()}, choices=(2, 3, 4))
    with pytest.raises(ValueError, match="every gradient of the clustered weights was zero over 2 batch"):
        dkm_hf.gradient_importance(model, tiny_lm_batches(2), loss_fn=lambda m, b: m(**b).logits.sum() * 0)

    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"w[": torch.nn.Linear(16, 16), "v": torch.nn.Linear(16, 16)})
    dense = copy.deepcopy(net)
    dkm_hf.prepare(net, DKMConfig(**PER_ROW_3BIT))
    x = torch.randn(8, 16)
    f = dkm_hf.gradient_importance(net, [x], loss_fn=lambda m, b: (m["w["](b) * 3 + m["v"](b)).square().mean())
    mixed = dkm_hf.allocate_bits(net, f, choices=(2, 4))
    assert r"(?:w\[)" in mixed.overrides and "w[" not in mixed.overrides
    widths = {n: s.layout.bits for n, s in dkm_hf.dkm_modules(dkm_hf.prepare(dense, mixed))}
    assert widths["w["] == mixed.overrides[r"(?:w\[)"]["bits"]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))


def test_a_sensitivity_with_per_channel_scales_is_what_the_scaled_initialisation_leaves():
    """With per_channel_scale, s(W, b) uses the scales initialisation would set from the current weights (computed
    aside), so it is sum F (W - hard W)^2 of `init_centroids(model, importance)` at that width; not the model's
    own scales, stale once the weights moved (as in training)."""
    config = DKMConfig(bits=2, weight_threshold=0, per_channel_scale=True)  # one LUT per weight, scaled rows
    model = dkm_hf.prepare(_net(), config)
    with torch.no_grad():  # moved since initialisation, each row by its own factor
        for _, state in dkm_hf.dkm_modules(model):
            state.weight.mul_(torch.linspace(0.5, 3.0, state.weight.shape[0])[:, None])
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    importance = dkm_hf.gradient_importance(model, [x], loss_fn=lambda m, b: m(b).square().mean())
    states = dict(dkm_hf.dkm_modules(model))
    table = sensitivities({n: (states[n], importance[n]) for n in importance}, [2])
    dkm_hf.init_centroids(model, importance)
    for name, state in dkm_hf.dkm_modules(model):
        expected = (importance[name] * (state.weight - state.hard_weight()).square()).sum().item()
        assert table[name][2] == pytest.approx(expected, rel=1e-5)


def test_a_weight_without_importance_takes_the_narrowest_width_even_with_bytes_to_spare():
    """Its sensitivity is zero at every width: neither the Lagrangian pick (ties go to the narrower width) nor the
    spending of the bytes left (only widenings that lower the sum) widens it."""
    model = dkm_hf.prepare(_net(), DKMConfig(**PER_ROW_3BIT), init=False)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    importance = dkm_hf.gradient_importance(model, [x], loss_fn=lambda m, b: m(b).square().mean())
    importance["0"] = torch.zeros_like(importance["0"])
    mixed = dkm_hf.allocate_bits(model, importance, choices=(2, 4), budget_bits=4)
    assert mixed.overrides["0"]["bits"] == 2
    assert mixed.overrides.get("1", {}).get("bits", 3) == 4


def test_the_bytes_left_are_spent_on_a_widening_that_fits_exactly():
    """A widening that needs exactly the bytes left fits."""
    errors = {"a": {2: 10.0, 4: 1.0}, "b": {2: 5.0, 4: 4.0}}
    sizes = {"a": {2: 100, 4: 200}, "b": {2: 100, 4: 200}}
    assert _spend(errors, sizes, 300, {"a": 2, "b": 2}) == {"a": 4, "b": 2}
    assert _spend(errors, sizes, 299, {"a": 2, "b": 2}) == {"a": 2, "b": 2}
    # no gain, no widening, whatever is left
    assert _spend({"a": {2: 0.0, 4: 0.0}}, {"a": {2: 100, 4: 200}}, 10_000, {"a": 2}) == {"a": 2}
