"""from_pretrained's own options on dkm_hf checkpoints: those that apply, and those refused up front by name."""

from __future__ import annotations

import pytest
import torch
from toy import save_toy_bert
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

import dkm_hf

logging.set_verbosity_error()
logging.disable_progress_bar()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A toy BERT's dense checkpoint, its palettized and its training checkpoints (the 2-label head unclustered)."""
    root = tmp_path_factory.mktemp("load_options")
    dense = save_toy_bert(root / "dense")
    config = dkm_hf.DKMConfig(bits=3, weight_threshold=1000)
    model = AutoModelForSequenceClassification.from_pretrained(dense, dkm_config=config)
    model.save_pretrained(root / "train")
    dkm_hf.palettize(model).save_pretrained(root / "palettized")
    return {"dense": dense, "train": root / "train", "palettized": root / "palettized", "model": model}


def test_a_palettized_backbone_takes_a_new_head_with_ignore_mismatched_sizes(saved):
    """num_labels changed: transformers re-initialises the unclustered head, the palettized body loads (before: the
    header check refused the head's shape, which the flag lets transformers handle)."""
    model, info = AutoModelForSequenceClassification.from_pretrained(
        saved["palettized"], num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert sorted(k for k, *_ in info["mismatched_keys"]) == ["classifier.bias", "classifier.weight"]
    assert model.classifier.out_features == 5
    x = torch.randint(0, 99, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.bert(x).last_hidden_state, saved["model"].bert(x).last_hidden_state)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="classifier.bias: shape"):
        AutoModelForSequenceClassification.from_pretrained(saved["palettized"], num_labels=5)


@pytest.mark.parametrize("kind", ["palettized", "train"])
def test_key_mapping_is_refused_for_dkm_checkpoints(saved, kind):
    """Their tensors carry the saving model's names, checked against config.json's records (before: names mapped
    away from the records loaded a palettized checkpoint as random dense layers, without an error)."""
    with pytest.raises(ValueError, match="key_mapping= does not apply"):
        AutoModelForSequenceClassification.from_pretrained(saved[kind], key_mapping={"^bert\\.": "bert."})


@pytest.mark.parametrize("kind", ["dense", "train"])
def test_a_dkm_model_offloaded_to_disk_is_refused_by_name(saved, kind, tmp_path):
    """device_map sending modules to disk: a DKM model's forward reads every layer's parameters (before: k-means on
    the offloaded meta tensors failed in `.item()`, or the first forward failed with a device error)."""
    kwargs = {"dkm_config": dkm_hf.DKMConfig(bits=3, weight_threshold=1000)} if kind == "dense" else {}
    device_map = {"bert.embeddings": "cpu", "bert.encoder": "disk", "bert.pooler": "cpu", "classifier": "cpu"}
    with pytest.raises(ValueError, match="offloaded to disk"):
        AutoModelForSequenceClassification.from_pretrained(
            saved[kind], device_map=device_map, offload_folder=str(tmp_path / "offload"), **kwargs
        )


def test_a_dkm_config_given_for_a_palettized_checkpoint_is_refused(saved):
    """transformers keeps the checkpoint's quantization_config when another is passed: a new DKMConfig was ignored
    and the palettized model came back without a DKM weight to train (before: only transformers' generic warning).
    The checkpoint's own config passed back loads it."""
    with pytest.raises(ValueError, match="already palettized.*dequantize"):
        AutoModelForSequenceClassification.from_pretrained(saved["palettized"], dkm_config=dkm_hf.DKMConfig(bits=2))
    own = AutoModelForSequenceClassification.from_pretrained(saved["palettized"]).config.quantization_config
    again = AutoModelForSequenceClassification.from_pretrained(saved["palettized"], quantization_config=own)
    assert dkm_hf.palettized_modules(again)


def test_a_different_dkm_config_given_for_a_training_checkpoint_is_refused(saved):
    """A training checkpoint (a DKM model's save, a Trainer's checkpoint-N) given another DKMConfig: transformers kept
    the checkpoint's, so a second phase at 2 bits trained at its 3 (before: only transformers' generic warning). The
    error names the settings that differ; the checkpoint's own settings load it, and dequantize + prepare is the way
    to new ones."""
    with pytest.raises(ValueError, match=r"differs from the one given in bits, milestone, .*dkm_hf.dequantize"):
        AutoModelForSequenceClassification.from_pretrained(
            saved["train"], dkm_config=dkm_hf.DKMConfig(bits=2, weight_threshold=1000, milestone=3)
        )
    same = dkm_hf.DKMConfig(bits=3, weight_threshold=1000)
    again = AutoModelForSequenceClassification.from_pretrained(saved["train"], quantization_config=same)
    listed = dkm_hf.DKMConfig(target_modules=["a", "b"])  # module lists match in any order
    assert not listed.differing_settings(dkm_hf.DKMConfig(target_modules=["b", "a"]))
    assert listed.differing_settings(dkm_hf.DKMConfig(target_modules=["a"])) == ["target_modules"]
    assert {w.layout.bits for _, w in dkm_hf.dkm_modules(again)} == {3}
    dkm_hf.dequantize(again)
    dkm_hf.prepare(again, dkm_hf.DKMConfig(bits=2, weight_threshold=1000))
    assert {w.layout.bits for _, w in dkm_hf.dkm_modules(again)} == {2}


def test_a_model_built_from_a_dkm_config_saves_and_loads_with_clear_errors(saved, tmp_path):
    """from_config on a palettized checkpoint's config builds plain layers under a config that declares palettized
    files: it saves as the dense model it is (before: under that config, and its reload blamed an interrupted save);
    dense weight files under such a config.json are refused saying dkm_hf did not write them."""
    import json
    import shutil

    from transformers import AutoConfig

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(saved["palettized"]))
    model.save_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert model.config.quantization_config["quant_method"] == "dkm"  # the model's own config is left as it was
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    x = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model.eval()(x).logits)
    shutil.copytree(saved["dense"], tmp_path / "mixed")
    config = json.loads((saved["palettized"] / "config.json").read_text())
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(config))
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="carry no dkm_hf metadata"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "mixed")


def test_a_palettized_base_model_loads_into_a_head_tied_to_its_embedding(tmp_path):
    """LlamaModel (tie_word_embeddings) saved palettized, loaded as LlamaForCausalLM: the new head shares the
    palettized embedding, as transformers ties it for a dense checkpoint (before: refused, telling the user to restore
    a config.json nobody had edited)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    base = dkm_hf.prepare(LlamaModel(config), dkm_hf.DKMConfig(bits=3, weight_threshold=0))
    dkm_hf.palettize(base).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert model.lm_head.tied_source is model.model.embed_tokens
    x = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        hidden = base(x).last_hidden_state
        torch.testing.assert_close(model(x).logits, hidden @ model.model.embed_tokens.weight.T)


def test_a_training_checkpoint_loads_into_a_head_class_with_a_new_clustered_layer(tmp_path):
    """A BertModel without its pooler, trained with DKM and saved (training format), loaded as
    BertForSequenceClassification: the new pooler, clustered by the config, gets centroids from its fresh weights
    (before: refused, the checkpoint 'without the DKM state' of a layer it never had); the rest loads as saved."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = dkm_hf.prepare(BertModel(config, add_pooling_layer=False), dkm_hf.DKMConfig(bits=3, weight_threshold=1000))
    base.save_pretrained(tmp_path / "train")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "train")
    modules = dict(dkm_hf.dkm_modules(model))
    assert "bert.pooler.dense" in modules and modules["bert.pooler.dense"].dkm_ready
    pooler = modules["bert.pooler.dense"]
    assert pooler.centroids.min() >= pooler.weight.min() and pooler.centroids.max() <= pooler.weight.max()
    for name, state in dkm_hf.dkm_modules(base):
        torch.testing.assert_close(modules["bert." + name].centroids, state.centroids, rtol=0, atol=0)


@pytest.mark.parametrize("per_row", [False, True])
def test_a_training_checkpoint_takes_a_new_clustered_head_with_ignore_mismatched_sizes(tmp_path, per_row):
    """num_labels changed on a training checkpoint whose classifier is clustered: transformers re-initialises the
    head, and its centroids come from the new weights (before: per-row LUTs were refused, a per-tensor LUT kept the
    old head's centroids, 25x the new weights' range)."""
    from toy import save_toy_bert

    layout = {"granularity": "per_grouped_channel", "group_size": 1} if per_row else {}
    config = dkm_hf.DKMConfig(bits=2, weight_threshold=0, **layout)
    model = AutoModelForSequenceClassification.from_pretrained(save_toy_bert(tmp_path / "dense"), dkm_config=config)
    with torch.no_grad():
        model.classifier.weight.mul_(25)  # the trained head: far from a fresh one
    model.classifier.init_centroids()
    model.save_pretrained(tmp_path / "train")
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "train", num_labels=5, ignore_mismatched_sizes=True
    )
    head = loaded.classifier
    assert head.weight.shape == (5, 32) and head.dkm_ready
    assert head.centroids.abs().max() <= head.weight.abs().max()
    torch.testing.assert_close(loaded.bert.pooler.dense.centroids, model.bert.pooler.dense.centroids)
