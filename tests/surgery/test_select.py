"""Which modules a DKMConfig clusters."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import AUTO
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.surgery.select import select_weights


def test_modules_to_not_convert_skips_everything_under_a_name(tiny_dir):
    """12.6: as transformers' should_convert_module: a name skips the module and every module under it."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"))
    names = select_weights(model, DKMConfig(weight_threshold=0, modules_to_not_convert=["model.layers.0"]))
    assert names and not any(n.startswith("model.layers.0.") for n in names)
    assert "model.layers.1.mlp.up_proj" in names
    # a prefix only matches at a module boundary: "layers.1" does not skip "layers.10"
    assert "model.layers.1.self_attn.q_proj" not in select_weights(
        model, DKMConfig(weight_threshold=0, modules_to_not_convert=["model.layers.1"])
    )
    names = select_weights(model, DKMConfig(weight_threshold=0, modules_to_not_convert=[r".*mlp"]))
    assert not any(".mlp." in n for n in names) and any("self_attn" in n for n in names)


def test_keep_in_fp32_modules_are_left_out_unless_targeted(caplog):
    """12.6: a model's `_keep_in_fp32_modules` (T5: the feed-forward output `wo`) is not clustered by default, as
    transformers' quantizers leave it, with a warning that names them; `target_modules` naming them clusters them
    (before, nothing could: `target_modules=["wo"]` selected nothing and the warning blamed the patterns)."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    model = T5ForConditionalGeneration(config)
    assert "wo" in model._keep_in_fp32_modules
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            names = select_weights(model, DKMConfig(weight_threshold=0))
    finally:
        hf_logging.disable_propagation()
    assert names and not any(n.endswith(".wo") for n in names)
    assert any(n.endswith(".wi") for n in names)
    assert "2 weight(s) left unclustered" in caplog.text and "in half precision (['wo']; e.g." in caplog.text
    assert select_weights(model, DKMConfig(weight_threshold=0, target_modules=["wo"])) == [
        "encoder.block.0.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.2.DenseReluDense.wo",
    ]
    everything = select_weights(model, DKMConfig(weight_threshold=0, target_modules=[".*"]))
    assert set(everything) == set(names) | {n for n in everything if n.endswith(".wo")} and len(everything) > len(
        names
    )
    # modules_to_not_convert still wins over target_modules
    assert (
        select_weights(model, DKMConfig(weight_threshold=0, target_modules=["wo"], modules_to_not_convert=["wo"]))
        == []
    )


def test_target_modules_and_threshold():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(4, 4))
    assert select_weights(model, DKMConfig(weight_threshold=100)) == ["0", "1"]
    assert select_weights(model, DKMConfig(weight_threshold=0, target_modules=["1", "2"])) == ["1", "2"]
    dkm_hf.prepare(model, DKMConfig(weight_threshold=0, target_modules=[r"[02]"]))
    assert [isinstance(m, dkm_hf.DKMMixin) for m in model] == [True, False, True]


def test_an_override_of_the_tied_side_alone_is_refused(tiny_dir):
    """The tied LM head is clustered once, with its embedding's settings: an override that matches the head alone and
    gives it other settings is refused naming both sides; one that matches both sides, or only the source, applies."""
    from transformers import AutoModelForCausalLM

    def prepared(overrides):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
        return dkm_hf.prepare(model, DKMConfig(bits=4, weight_threshold=0, overrides=overrides), init=False)

    with pytest.raises(ValueError, match=r"\['lm_head'\] match lm_head, which shares its weight with "
                       r"model.embed_tokens .*bits: 8 against 4"):  # fmt: skip
        prepared({"lm_head": {"bits": 8}})
    for overrides in ({"lm_head|.*embed_tokens": {"bits": 8}}, {".*embed_tokens": {"bits": 8}}):
        bits = {name: w.layout.bits for name, w in dkm_hf.dkm_modules(prepared(overrides))}
        assert bits["model.embed_tokens"] == bits["lm_head"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4
    prepared({"lm_head": {"bits": 4}})  # the same settings as the source's: nothing to refuse


@pytest.mark.parametrize(
    "leave_out", [{"target_modules": ["lm_head", "q_proj"]}, {"modules_to_not_convert": ["model.embed_tokens"]}]
)
def test_a_tied_pair_with_one_side_selected_is_left_dense_and_tied(tiny_dir, tmp_path, caplog, leave_out):
    """A tied weight is clustered once, by its source: with one side selected neither is clustered (a warning names
    both), the tie stays one tensor, and the palettized save reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_dir("llama"), dkm_config=DKMConfig(bits=2, weight_threshold=0, **leave_out)
        )
    assert "lm_head and model.embed_tokens share a weight but only one is selected" in caplog.text
    names = [n for n, _ in dkm_hf.dkm_modules(model)]
    assert names and "lm_head" not in names and "model.embed_tokens" not in names
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "palettized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "palettized")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_patterns_that_match_no_weight_are_warned(tiny_dir, caplog):
    """A misspelt modules_to_not_convert entry would cluster the layer it meant to keep: every target_modules /
    modules_to_not_convert pattern that names no weight is warned by name; the ones that match are not."""
    import logging

    from transformers import AutoModelForCausalLM

    hf_logging.enable_propagation()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    config = DKMConfig(
        weight_threshold=0,
        target_modules=["qeury", "q_proj", "up_proj"],
        modules_to_not_convert=["model.layers.0.mlp", "lm_heda"],
    )
    with caplog.at_level(logging.WARNING):
        dkm_hf.prepare(model, config, init=False)
    warned = [r.getMessage() for r in caplog.records if "names no weight" in r.getMessage()]
    assert len(warned) == 2 and "'qeury'" in warned[0] and "'lm_heda'" in warned[1]
    assert {n for n, _ in dkm_hf.dkm_modules(model)} == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"
    }  # fmt: skip


def test_an_override_written_for_the_head_model_names_the_prefix_in_the_base_model(tiny_dir):
    """A head model's names carry the base model's prefix ("model."); its base model's do not: the refusal says so."""
    from transformers import AutoModel

    config = DKMConfig(weight_threshold=0, overrides={"model.layers.1.mlp.down_proj": {"bits": 2}})
    assert "model.layers.1.mlp.down_proj" in select_weights(AUTO["llama"].from_pretrained(tiny_dir("llama")), config)
    with pytest.raises(ValueError, match=r"matches none of .* with the head model's prefix 'model'"):
        select_weights(AutoModel.from_pretrained(tiny_dir("llama")), config)
    with pytest.raises(ValueError, match=r"matches none of [^;]*\)$"):  # no hint where the prefix would not help
        select_weights(AutoModel.from_pretrained(tiny_dir("llama")), DKMConfig(overrides={"nothing": {"bits": 2}}))


def test_biases_are_never_clustered_not_even_two_dimensional_ones():
    """GPT-OSS's per-expert biases (experts, features) were clustered (one LUT across the experts) and given widths
    by allocate_bits; the README says biases stay float."""

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 32))
            self.gate_up_proj_bias = nn.Parameter(torch.randn(4, 32))
            self.bias = nn.Parameter(torch.randn(8, 8))

    model = nn.ModuleDict({"experts": Experts(), "proj": nn.Linear(16, 16)})
    assert select_weights(model, DKMConfig(bits=2, weight_threshold=0)) == ["experts.gate_up_proj", "proj"]


def test_a_weight_of_exactly_weight_threshold_elements_is_clustered():
    """ "Weights with fewer elements stay uncompressed": one of exactly that many is clustered."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(3, 5))  # 16 and 15 weights
    assert select_weights(model, DKMConfig(weight_threshold=16)) == ["0"]
    assert select_weights(model, DKMConfig(weight_threshold=15)) == ["0", "1"]


def test_values_whose_squared_distances_could_overflow_are_refused_at_the_bound():
    """k-means and the DKM loop sum n squared distances (w - c)^2 <= (2 max|w|)^2 in float32: a weight is refused
    above sqrt(float32 max / (4 n)); for 16 values that is 2.3e18, so 3e18 is refused and 2e18 is not."""
    import pytest

    from dkm_hf.surgery.select import check_clusterable

    weight = torch.zeros(4, 4)
    weight[0, 0] = 3e18
    with pytest.raises(ValueError, match="could overflow above 2.31e\\+18"):
        check_clusterable("w", weight, torch.float32)
    weight[0, 0] = 2e18
    check_clusterable("w", weight, torch.float32)
