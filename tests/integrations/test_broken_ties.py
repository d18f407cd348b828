"""A tie broken after clustering (the tied side untied or given a weight of its own, the shared side replaced) is
refused by name where it would be used, before anything changes: never a forward that silently reads the old shared
weight, a palettize() that stops half-way, or a checkpoint its loader refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import AUTO, tiny_lm_batches

import dkm_hf
from dkm_hf import DKMConfig


def _tied_llama(tiny_dir):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=2, weight_threshold=0))
    assert model.lm_head.tied_source is model.model.embed_tokens
    return model.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_a_tied_weight_given_a_weight_of_its_own_is_refused_and_ties_again(tiny_dir):
    """transformers' way to untie (config.tie_word_embeddings=False, a new lm_head weight, tie_weights()): the head
    kept reading the embedding's clustered weight and palettize() dropped its values. A parameter of the same values
    (`load_state_dict(assign=True)` gives each module its own) is still the tie."""
    model, batch = _tied_llama(tiny_dir), tiny_lm_batches(1)[0]
    expected = _logits(model, batch)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    for action in (model.tie_weights, lambda: dkm_hf.palettize(model)):
        with pytest.raises(ValueError, match="lm_head was clustered tied to model.embed_tokens .* weight of its own"):
            action()
    assert len(dkm_hf.dkm_modules(model)) == 16 and not dkm_hf.palettized_modules(model)  # nothing converted
    model.config.tie_word_embeddings = True
    model.tie_weights()
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    torch.testing.assert_close(_logits(dkm_hf.palettize(model), batch), expected, rtol=0, atol=0)


def test_a_replaced_shared_weight_is_refused_before_anything_changes(tiny_dir, tmp_path):
    """set_input_embeddings(new) on a tied clustered model: tie_weights() kept the head tied to the old clustered
    embedding, palettize() failed after converting half the model; palettized, the save failed with a KeyError."""
    model, batch = _tied_llama(tiny_dir), tiny_lm_batches(1)[0]
    expected = _logits(model, batch)
    model.set_input_embeddings(torch.nn.Embedding(*model.model.embed_tokens.weight.shape))
    for action in (model.tie_weights, lambda: dkm_hf.palettize(model)):
        with pytest.raises(ValueError, match="lm_head is tied to a clustered weight that is not part of the model"):
            action()
    assert len(dkm_hf.dkm_modules(model)) == 15 and not dkm_hf.palettized_modules(model)
    assert _logits(model, batch).shape == expected.shape  # the model still runs

    palettized = dkm_hf.palettize(_tied_llama(tiny_dir))
    palettized.set_input_embeddings(torch.nn.Embedding(*palettized.lm_head.weight.shape))
    with pytest.raises(ValueError, match="lm_head is tied to a clustered weight that is not part of the model"):
        palettized.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("palettized", [False, True])
def test_a_tie_its_config_no_longer_declares_is_not_saved(tiny_dir, tmp_path, palettized):
    """config.tie_word_embeddings=False on a tied clustered model: palettized, the save wrote a checkpoint whose
    loader refused it; as a training checkpoint, one that loaded with a new random head (lm_head was not stored)."""
    model, batch = _tied_llama(tiny_dir), tiny_lm_batches(1)[0]
    model = dkm_hf.palettize(model) if palettized else model
    expected = _logits(model, batch)
    model.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="lm_head is clustered tied to model.embed_tokens .* nothing was saved"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.config.tie_word_embeddings = True
    model.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(AUTO["llama"].from_pretrained(tmp_path / "out"), batch), expected)


@pytest.mark.parametrize("palettized", [False, True])
def test_a_tied_head_dequantized_alone_saves_and_loads(tiny_dir, tmp_path, palettized, caplog):
    """`dkm_hf.dequantize(model.lm_head)` (README: for peft's modules_to_save), then a save. Palettized, the loader
    refused the checkpoint (the config ties the pair, one side palettized): the save says so, and with
    tie_word_embeddings=False the head is stored dense and loads. A training checkpoint stores both sides with
    different values: transformers leaves them untied and the head is clustered on its own (before: tied again, its
    values unused)."""
    model, batch = _tied_llama(tiny_dir), tiny_lm_batches(1)[0]
    model = dkm_hf.palettize(model) if palettized else model
    dkm_hf.dequantize(model.lm_head)
    expected = _logits(model, batch)
    if palettized:
        with pytest.raises(ValueError, match="ties lm_head to model.embed_tokens, but only one of them is palettized"):
            model.save_pretrained(tmp_path / "out")
        model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "out")
    with caplog.at_level("WARNING"):
        reloaded = AUTO["llama"].from_pretrained(tmp_path / "out")
    if palettized:
        assert type(reloaded.lm_head) is torch.nn.Linear  # stored dense, untied
    else:  # the dequantized head takes the embedding's 4 values: clustered on its own, losslessly
        assert "['lm_head'] stored with values of their own" in caplog.text and reloaded.lm_head.tied_source is None
    torch.testing.assert_close(_logits(reloaded.eval(), batch), expected, rtol=0, atol=1e-6)


def test_a_head_stored_apart_from_a_tied_embedding_is_clustered_on_its_own(tiny_dir, tmp_path):
    """A checkpoint whose config ties the head to the embedding but which stores the head with values of its own
    (T5 v1.1, flan-T5: their configs tie the pair whatever config.json says): transformers loads the two apart; the
    DKM model tied them again and the stored head was never used."""
    from safetensors.torch import load_file, save_file

    path = Path(tiny_dir("llama"))
    tensors = load_file(path / "model.safetensors")
    head = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file({**tensors, "lm_head.weight": head}, path / "model.safetensors", metadata={"format": "pt"})
    model = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(bits=2, weight_threshold=0)).eval()
    assert model.lm_head.tied_source is None and torch.equal(model.lm_head.weight, head)
    assert model.lm_head.hard_weight().unique().numel() == 4  # its own LUT
    batch = tiny_lm_batches(1)[0]
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "train")  # a training checkpoint: the head's centroids stored, loaded
    torch.testing.assert_close(_logits(AUTO["llama"].from_pretrained(tmp_path / "train"), batch), expected)
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    torch.testing.assert_close(_logits(AUTO["llama"].from_pretrained(tmp_path / "pal"), batch), expected)
