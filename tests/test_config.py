from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoQuantizationConfig
from transformers.utils import logging as hf_logging

import dkm_hf
from dkm_hf import DKMConfig
from dkm_hf.config import FORMAT_VERSION
from dkm_hf.surgery.select import select_weights


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 2.5}, "bits"),
        ({"cluster_dim": 0}, "cluster_dim"),
        ({"tau": 0}, "tau"),
        ({"kmeans_restarts": 0}, "kmeans_restarts"),
        ({"tau": -1e-4}, "tau"),
        ({"epsilon": 0}, "epsilon"),
        ({"max_iters": 0}, "max_iters"),
        ({"granularity": "per_block"}, "granularity"),
        ({"granularity": "per_grouped_channel"}, "group_size"),
        ({"granularity": "per_grouped_channel", "group_size": 0}, "group_size"),
        ({"group_size": 4}, "group_size"),
        ({"implementation": "fast"}, "implementation"),
        ({"implementation": "uniquified", "cluster_dim": 2}, "uniquified"),
        ({"lut_dtype": "int8"}, "lut_dtype"),
        ({"overrides": {".*query": {"bits": 12}}}, "bits"),
        ({"overrides": {".*query": {"speed": 1}}}, "speed"),
        ({"overrides": {"(": {"bits": 2}}}, "overrides"),
        ({"target_modules": ["["]}, "target_modules"),
        ({"tau": float("inf")}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"cluster_embeddings": "no"}, "cluster_embeddings"),
        ({"per_channel_scale": 1}, "per_channel_scale"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -1}, "seed"),
        ({"target_modules": [3]}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"modules_to_not_convert": [None]}, "modules_to_not_convert"),
        ({"weight_threshold": 1.5}, "weight_threshold"),
        ({"max_iters": True}, "max_iters"),
        ({"max_iters": 2**24 + 1}, r"max_iters must be an integer in \[1, 16777216\]"),  # the fused kernels' bound
        ({"overrides": {".*": {"tau": float("inf")}}}, "tau"),
        ({"overrides": ["a"]}, "overrides"),
    ],
)
def test_invalid_values_name_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        DKMConfig(**kwargs)
    if field in kwargs and not isinstance(kwargs[field], (dict, list)):
        assert repr(kwargs[field]) in str(err.value)


def test_round_trip_exact():
    config = DKMConfig(
        bits=3,
        cluster_dim=2,
        tau=3e-5,
        granularity="per_grouped_channel",
        group_size=8,
        per_channel_scale=True,
        overrides={r".*embeddings.*": {"bits": 2, "cluster_dim": 1}},
        target_modules=["query", "key"],
        milestone=5,
    )
    as_dict = config.to_dict()
    assert as_dict["quant_method"] == "dkm"
    assert DKMConfig.from_dict(as_dict) == config
    assert DKMConfig.from_dict(json.loads(config.to_json_string())) == config
    assert AutoQuantizationConfig.from_dict(as_dict) == config
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["dkm"] is DKMConfig


def test_unknown_field_in_dict_is_an_error():
    with pytest.raises(ValueError, match="nbits"):
        DKMConfig.from_dict({"quant_method": "dkm", "nbits": 4})


def test_from_dict_of_a_non_dict_names_the_type():
    with pytest.raises(TypeError, match=r"needs a dict .* got a list: \[\]"):
        DKMConfig.from_dict([])


def test_checkpoint_from_a_newer_release_loads_with_a_warning_naming_its_new_fields(tiny_dir, tmp_path, caplog):
    """config.json records every training setting; a newer release with the same format version may add some. The
    palettized model loads (the layout is all loading needs) and the unknown fields are named; a newer format version
    is still refused."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), dkm_config=DKMConfig(bits=2))
    dkm_hf.palettize(model)
    model.save_pretrained(tmp_path / "saved")
    config_path = tmp_path / "saved" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] |= {"kmeans_inertia_goal": 0.5, "trainer_flavour": "new"}
    config_path.write_text(json.dumps(config))

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert "['kmeans_inertia_goal', 'trainer_flavour']" in caplog.text
    assert len(dkm_hf.palettized_modules(reloaded)) == len(dkm_hf.palettized_modules(model))
    x = torch.arange(1, 9).view(1, 8)
    torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    assert "kmeans_inertia_goal" not in reloaded.config.quantization_config.to_dict()

    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version must be"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")


def test_override_resolution():
    config = DKMConfig(bits=4, overrides={r".*\.value": {"bits": 2, "tau": 3e-5}, "classifier": {"cluster_dim": 2}})
    assert config.layout_for("bert.encoder.layer.0.attention.self.value", (8, 8)).bits == 2
    assert config.settings_for("bert.encoder.layer.0.attention.self.value").tau == 3e-5
    assert config.layout_for("bert.encoder.layer.0.attention.self.query", (8, 8)).bits == 4
    assert config.settings_for("bert.encoder.layer.0.attention.self.query").tau == 0.01
    assert config.layout_for("classifier", (8, 8)).cluster_dim == 2


def test_an_override_to_per_tensor_drops_the_inherited_group_size():
    """per_grouped_channel defaults with a per_tensor override: the layer is per tensor, the group size not carried
    over (and refused, which it was, only where the override itself gives one)."""
    config = DKMConfig(
        granularity="per_grouped_channel", group_size=4, overrides={"fc": {"granularity": "per_tensor"}}
    )
    assert config.layout_for("fc", (16, 8)).lut_shape[0] == 1
    assert config.layout_for("other", (16, 8)).lut_shape[0] == 4
    assert DKMConfig.from_dict(config.to_dict()).layout_for("fc", (16, 8)).lut_shape[0] == 1
    with pytest.raises(ValueError, match=r"overrides\['fc'\]\.group_size is only used"):
        DKMConfig(
            group_size=4,
            granularity="per_grouped_channel",
            overrides={"fc": {"granularity": "per_tensor", "group_size": 2}},
        )


def test_granularity_and_group_size_resolve_per_weight_after_every_matching_override():
    """Overrides apply in order; a weight's granularity and group size are checked once all that match it applied."""
    back = DKMConfig(
        granularity="per_grouped_channel",
        group_size=4,
        overrides={".*": {"granularity": "per_tensor"}, "2": {"granularity": "per_grouped_channel"}},
    )
    assert back.layout_for("2", (64, 8)).lut_shape[0] == 16  # the defaults' group size, not per tensor
    assert back.layout_for("1", (64, 8)).lut_shape[0] == 1
    nested = DKMConfig(
        overrides={".*": {"granularity": "per_grouped_channel", "group_size": 2}, "2": {"group_size": 4}}
    )
    assert (nested.layout_for("2", (64, 8)).lut_shape[0], nested.layout_for("1", (64, 8)).lut_shape[0]) == (16, 32)
    ignored = DKMConfig(
        granularity="per_grouped_channel",
        group_size=4,
        overrides={".*": {"granularity": "per_tensor"}, "2": {"group_size": 8}},
    )
    with pytest.raises(ValueError, match=r"overrides\['2'\] sets group_size 8 for 2, which overrides\['\.\*'\] make"):
        ignored.layout_for("2", (64, 8))
    missing = DKMConfig(overrides={"2": {"granularity": "per_grouped_channel"}})
    with pytest.raises(
        ValueError, match=r"overrides\['2'\] make\(s\) 2 per_grouped_channel and the defaults give it no"
    ):
        missing.layout_for("2", (64, 8))
    # all grouped but the embedding: a group size set before the layer was made per_tensor is ignored (as it was)
    all_but = DKMConfig(
        overrides={
            ".*": {"granularity": "per_grouped_channel", "group_size": 8},
            ".*embed.*": {"granularity": "per_tensor"},
        }
    )
    assert all_but.layout_for("model.embed_tokens", (64, 8)).lut_shape[0] == 1
    assert all_but.layout_for("model.layers.0.mlp.up_proj", (64, 8)).lut_shape[0] == 8
    # an override that changes the width only, with group_size None spelt out, on per_tensor defaults (accepted before)
    spelt = DKMConfig(overrides={"lm_head": {"group_size": None, "bits": 3}})
    assert DKMConfig.from_dict(spelt.to_dict()).layout_for("lm_head", (64, 8)).bits == 3


@pytest.mark.parametrize(("bits", "tau"), [(8, 0.01), (4, 0.01), (3, 0.05), (2, 0.05), (1, 0.05)])
def test_default_tau_follows_each_layers_bit_width(bits, tau):
    """tau=None is the measured relative tau of the layer's own bit width, overrides included; a given tau wins."""
    assert DKMConfig(bits=bits).settings_for("layer").tau == tau
    mixed = DKMConfig(bits=4, overrides={"head": {"bits": bits}, "body": {"bits": bits, "tau": 0.3}})
    assert (mixed.settings_for("head").tau, mixed.settings_for("body").tau) == (tau, 0.3)
    assert mixed.settings_for("other").tau == 0.01
    assert DKMConfig(bits=bits, tau=0.2).settings_for("layer").tau == 0.2
    # serialised as None, so a reloaded config resolves the same way
    assert DKMConfig.from_dict(DKMConfig(bits=bits).to_dict()).settings_for("layer").tau == tau


def test_kmeans_restarts_reach_every_module():
    assert DKMConfig().settings_for("layer").kmeans_restarts == 1
    assert DKMConfig(kmeans_restarts=3).settings_for("layer").kmeans_restarts == 3


def test_absolute_tau_must_be_given():
    with pytest.raises(ValueError, match="tau_scale='absolute' needs an explicit tau"):
        DKMConfig(tau_scale="absolute")
    with pytest.raises(ValueError, match=r"overrides\['head'\].*explicit tau"):
        DKMConfig(tau=1e-4, tau_scale="absolute", overrides={"head": {"tau": None}})
    assert DKMConfig(tau=1e-4, tau_scale="absolute", overrides={"head": {"bits": 2}}).settings_for("head").tau == 1e-4
    # a malformed override is named as such, not tripped over by the tau check
    with pytest.raises(ValueError, match=r"overrides\['head'\] must be a dict"):
        DKMConfig(tau=1e-4, tau_scale="absolute", overrides={"head": 3})


@pytest.mark.parametrize(
    ("record", "field"), [({"format": "gguf"}, "format"), ({"format_version": 99}, "format_version")]
)
def test_invalid_checkpoint_record_names_the_field(record, field):
    with pytest.raises(ValueError, match=field):
        DKMConfig.from_dict({"quant_method": "dkm", **record})


def test_dkm_config_and_quantization_config_are_the_same(tiny_dir):
    path = tiny_dir("bert")
    a = AutoModelForSequenceClassification.from_pretrained(path, dkm_config=DKMConfig(bits=2))
    b = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=DKMConfig(bits=2))
    assert isinstance(a.config.quantization_config, DKMConfig)
    assert [n for n, _ in dkm_hf.dkm_modules(a)] == [n for n, _ in dkm_hf.dkm_modules(b)]
    with pytest.raises(ValueError, match="not both"):
        AutoModelForSequenceClassification.from_pretrained(
            path, dkm_config=DKMConfig(), quantization_config=DKMConfig()
        )


def test_config_json_carries_the_config(tiny_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), dkm_config=DKMConfig(bits=3))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "dkm" and saved["bits"] == 3 and saved["format"] == "train"


def test_callers_config_is_not_mutated(tiny_dir, tmp_path):
    config = DKMConfig(bits=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), dkm_config=config)
    dkm_hf.palettize(model)
    model.save_pretrained(tmp_path / "out")
    assert config.record.format == "train" and config.record.modules == {}
    assert model.config.quantization_config.record.format == "palettized"


def test_a_config_changed_after_it_was_built_is_checked_before_anything_changes(tiny_dir):
    """`update` (transformers' API), `from_dict(**kwargs)` and plain assignment cannot slip a bad value past the
    constructor's checks: `update` and `from_dict` refuse it (an `update` leaves every field as it was), and a
    config assigned a bad field is refused by `prepare` and `from_pretrained` before any weight is converted."""
    config = DKMConfig(weight_threshold=0)
    with pytest.raises(ValueError, match=r"bits .* 9"):
        config.update(bits=9, tau=0.5)
    assert config.bits == 4 and config.tau is None
    assert config.update(bits=3, unknown=1) == {"unknown": 1} and config.bits == 3
    with pytest.raises(ValueError, match=r"bits .* 12"):
        DKMConfig.from_dict({"bits": 3}, bits=12)
    assert DKMConfig.from_dict({"bits": 3}, bits=2).bits == 2
    config.bits = 0
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"))
    with pytest.raises(ValueError, match=r"bits .* 0"):
        dkm_hf.prepare(model, config)
    assert not dkm_hf.dkm_modules(model) and dkm_hf.get_dkm_config(model) is None
    for kwargs in ({"dkm_config": config}, {"quantization_config": config}):
        with pytest.raises(ValueError, match=r"bits .* 0"):
            AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), **kwargs)


def test_uniquified_refuses_an_override_with_vectors():
    with pytest.raises(ValueError, match=r"uniquified.*overrides\['.\*dense'\].*cluster_dim=2"):
        DKMConfig(implementation="uniquified", overrides={".*dense": {"cluster_dim": 2}})
    DKMConfig(implementation="uniquified", overrides={".*dense": {"cluster_dim": 1, "bits": 3}})


def test_the_order_of_overrides_survives_json_and_a_checkpoint(tmp_path):
    """The later of two matching overrides wins, and JSON writers sort dict keys: overrides are written as
    [pattern, settings] pairs (before: a reloaded training checkpoint applied them in sorted order, other settings
    for `layers.0`, or with `bits` in them, centroids of another shape that failed to load)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    overrides = {r".*layers\.0\..*": {"tau": 0.5, "bits": 2}, ".*": {"tau": 0.02, "bits": 3}}
    config = DKMConfig(bits=4, weight_threshold=0, overrides=overrides)
    reloaded = DKMConfig.from_dict(json.loads(config.to_json_string()))
    assert list(reloaded.overrides) == list(overrides) and reloaded == config
    name = "model.layers.0.mlp.up_proj"
    assert (config.settings_for(name).tau, config.layout_for(name, (8, 8)).bits) == (0.02, 3)
    assert DKMConfig(overrides=[["a", {"bits": 2}], ["b", {"bits": 3}]]).overrides == {
        "a": {"bits": 2},
        "b": {"bits": 3},
    }
    swapped = DKMConfig(bits=4, weight_threshold=0, overrides=dict(reversed(overrides.items())))
    assert swapped.layout_for(name, (8, 8)).bits == 2 and swapped != config  # equal dicts, other behaviour

    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(tiny).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=config)
    model.save_pretrained(tmp_path / "train")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "train")
    for (n, a), (_, b) in zip(dkm_hf.dkm_modules(model), dkm_hf.dkm_modules(again)):
        assert (a.layout, a.settings) == (b.layout, b.settings), n
        assert a.layout.bits == 3


def test_prepare_leaves_a_config_shared_with_another_model_alone(tmp_path):
    """Two models built in code from one config object (a student and its teacher): preparing one gives it a config
    of its own (before: the teacher's config declared DKM, and the dense teacher saved a checkpoint that failed to
    load)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    shared = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    student, teacher = LlamaForCausalLM(shared), LlamaForCausalLM(shared)
    dkm_hf.prepare(student, DKMConfig(weight_threshold=0))
    assert getattr(teacher.config, "quantization_config", None) is None
    assert student.model.config is student.config  # the modules that kept a reference follow
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    assert not dkm_hf.dkm_modules(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"))


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"format_version": True}, "format_version"),  # JSON true is not version 1
        ({"save_id": 5}, "save_id"),
        ({"modules": []}, "modules"),
    ],
)
def test_malformed_checkpoint_record_fields_are_refused_by_name(record, field):
    with pytest.raises(ValueError, match=f"DKMConfig.{field}"):
        DKMConfig.from_dict({"quant_method": "dkm", **record})


def test_override_pairs_that_repeat_a_pattern_are_refused():
    """to_dict's [pattern, settings] pairs become a dict only when no pattern repeats: two pairs for one pattern
    would silently drop the first."""
    with pytest.raises(ValueError, match="overrides must be a dict"):
        DKMConfig(overrides=[["a", {"bits": 2}], ["a", {"bits": 3}]])
    assert DKMConfig(overrides=[["a", {"bits": 2}], ["b", {"bits": 3}]]).overrides == {
        "a": {"bits": 2},
        "b": {"bits": 3},
    }


def test_a_suffix_pattern_matches_at_a_dot_only():
    """ "proj" names `proj` and `block.proj`, not `up_proj` (a dotted suffix, or a full regex)."""
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "up_proj": nn.Linear(8, 8)})
    model.add_module("block", nn.ModuleDict({"proj": nn.Linear(8, 8)}))
    assert select_weights(model, DKMConfig(weight_threshold=0, target_modules=["proj"])) == ["proj", "block.proj"]
    config = DKMConfig(weight_threshold=0, overrides={"proj": {"bits": 2}})
    assert config.layout_for("up_proj", (8, 8)).bits == 4 and config.layout_for("block.proj", (8, 8)).bits == 2


def test_module_lists_given_as_sets_are_sorted():
    """A set's order is the hash seed's: kept as given, config.json changed between processes for one config."""
    names = [f"layers.{i}.proj" for i in range(10, 22)]  # 12 names: a set's order is sorted once in 12! seeds
    config = DKMConfig(target_modules=set(names), modules_to_not_convert={"lm_head", "a"})
    assert config.target_modules == names and config.modules_to_not_convert == ["a", "lm_head"]
