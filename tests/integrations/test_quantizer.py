"""Loading through DKMHfQuantizer: every checkpoint whose config and files disagree ends in a clear error or in the
right model, never in a model with uninitialised or random weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import AUTO, tiny_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaForCausalLM

import dkm_hf
from dkm_hf import DKMConfig, PalettizedCheckpointError
from dkm_hf.integrations.safetensors_files import ALLOW_OUTSIDE_ENV


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.metadata()


def _as_version_1(path: Path) -> None:
    """Make config.json look written by a release of format version 1: no save id (the files are rewritten apart)."""

    def edit(config):
        config["quantization_config"]["format_version"] = 1
        config["quantization_config"].pop("save_id")

    _edit_config(path, edit)


def _logits(model, name="llama"):
    with torch.no_grad():
        return model.eval()(**tiny_inputs(name)).logits


@pytest.fixture
def training_checkpoint(tiny_dir, tmp_path):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    model.train()
    model(**tiny_inputs("llama")).logits.sum().backward()  # centroids move away from their initial values
    model.save_pretrained(tmp_path / "train")
    return tmp_path / "train", model


def test_training_checkpoint_without_centroids_is_refused(training_checkpoint):
    """12.1a: a training checkpoint carries its centroids; without them no model with garbage centroids loads."""
    path, _ = training_checkpoint
    tensors = load_file(path / "model.safetensors")
    dropped = "model.layers.0.mlp.up_proj.centroids"
    save_file({k: v for k, v in tensors.items() if k != dropped}, path / "model.safetensors", _metadata(path))
    with pytest.raises(PalettizedCheckpointError, match=r"without the DKM state of 1 tensor.*up_proj\.centroids"):
        AUTO["llama"].from_pretrained(path)


def test_dkm_written_training_checkpoint_without_any_centroid_is_refused(training_checkpoint):
    path, _ = training_checkpoint
    tensors = load_file(path / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.endswith("centroids")}
    save_file(kept, path / "model.safetensors", _metadata(path))
    with pytest.raises(PalettizedCheckpointError, match="written by dkm_hf as a training checkpoint but hold no"):
        AUTO["llama"].from_pretrained(path)


def test_training_checkpoint_reloads_its_centroids(training_checkpoint):
    path, model = training_checkpoint
    loaded = AUTO["llama"].from_pretrained(path)
    for (name, a), (_, b) in zip(dkm_hf.dkm_modules(model), dkm_hf.dkm_modules(loaded)):
        if a.tied_source is None:
            assert torch.equal(a.centroids, b.centroids), name
    assert torch.equal(_logits(loaded), _logits(model))


def test_dense_checkpoint_declaring_dkm_initialises_centroids_from_its_weights(tiny_dir):
    """12.1b: quantization_config added to a dense config.json by hand: centroids come from the weights."""
    path = Path(tiny_dir("llama"))
    _edit_config(path, lambda c: c.__setitem__("quantization_config", {"quant_method": "dkm", "bits": 4}))
    declared = AUTO["llama"].from_pretrained(path)
    (path / "config.json").write_text(
        json.dumps(
            {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "quantization_config"}
        )
    )
    explicit = AUTO["llama"].from_pretrained(path, dkm_config=DKMConfig(bits=4))
    for (name, a), (_, b) in zip(dkm_hf.dkm_modules(declared), dkm_hf.dkm_modules(explicit)):
        if a.tied_source is None:
            assert torch.isfinite(a.centroids).all() and torch.equal(a.centroids, b.centroids), name
    assert torch.equal(_logits(declared), _logits(explicit))


def test_values_are_checked_once_loaded_not_before(tmp_path):
    """A parameter built with a legacy constructor (`torch.Tensor(n)`: Wav2Vec2's codevectors, Mask2Former's
    level_embed) holds uninitialised memory, not meta, until the checkpoint loads: the NaN / range checks ran on it
    and refused a sound checkpoint at random. The loaded values are what is checked, at a dense load and for a
    weight a training checkpoint lacks."""
    from transformers import LlamaConfig
    from transformers.modeling_utils import PreTrainedModel

    class Legacy(PreTrainedModel):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            # a CPU tensor even where transformers builds the model on the meta device; NaN: garbage until loaded
            self.table = torch.nn.Parameter(torch.Tensor(16, 8).fill_(float("nan")))
            self.proj = torch.nn.Linear(8, 8)
            self.post_init()

        def _init_weights(self, module):  # what a new layer gets: values k-means cannot cluster
            if module is self:
                torch.nn.init.constant_(self.table, float("inf"))

        def forward(self, ids):
            return self.proj(self.table[ids])

    torch.manual_seed(0)
    model = Legacy(LlamaConfig())
    with torch.no_grad():
        model.table.copy_(torch.randn(16, 8))
    model.save_pretrained(tmp_path / "dense")
    loaded = Legacy.from_pretrained(tmp_path / "dense", dkm_config=DKMConfig(bits=8, weight_threshold=0))
    assert {n for n, _ in dkm_hf.dkm_modules(loaded)} == {"table", "proj"}
    torch.testing.assert_close(loaded.table, model.table)  # 8 bits, 128 values per LUT: every value a centroid
    with torch.no_grad():
        model.table[3, 4] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"^table: 1 value\(s\) of the weight are NaN or infinite"):
        Legacy.from_pretrained(tmp_path / "broken", dkm_config=DKMConfig(bits=8, weight_threshold=0))
    # a training checkpoint lacking the weight (a new layer): its values are the model's own, checked as they init
    trained = Legacy.from_pretrained(tmp_path / "dense", dkm_config=DKMConfig(bits=8, weight_threshold=0))
    trained.save_pretrained(tmp_path / "train")
    state = {k: v for k, v in load_file(tmp_path / "train" / "model.safetensors").items() if not k.startswith("table")}
    metadata = safe_open(tmp_path / "train" / "model.safetensors", "pt").metadata()
    save_file(state, tmp_path / "train" / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"^table: 128 value\(s\) of the weight are NaN or infinite"):
        Legacy.from_pretrained(tmp_path / "train")


@pytest.fixture
def palettized_checkpoint(tiny_dir, tmp_path):
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    return tmp_path / "pal", model


@pytest.mark.parametrize("edit", ["train", "delete"])
def test_palettized_files_are_never_read_as_a_training_checkpoint(palettized_checkpoint, edit):
    """12.2: config.json's format and the files' dkm_format metadata must agree."""
    path, _ = palettized_checkpoint
    quant = lambda c: c["quantization_config"]  # noqa: E731
    _edit_config(
        path, lambda c: quant(c).__setitem__("format", "train") if edit == "train" else quant(c).pop("format")
    )
    with pytest.raises(PalettizedCheckpointError, match="format='train' but the safetensors files were written as"):
        AUTO["llama"].from_pretrained(path)


@pytest.mark.parametrize(
    ("tie", "message"),
    [
        ({"tied_to": "model.layers.0.mlp.up_proj"}, "but the model does not tie their weights"),
        ({"tied_to": ["model.embed_tokens"]}, "has a malformed tie record"),
        ({"tied_to": "model.nope"}, "is tied to 'model.nope', which is not a palettized module"),
    ],
)
def test_ties_must_be_ties_of_the_architecture(palettized_checkpoint, tie, message):
    """12.3: a `tied_to` record is checked against the model's real tied weights."""
    path, _ = palettized_checkpoint
    _edit_config(path, lambda c: c["quantization_config"]["modules"].__setitem__("model.layers.0.mlp.down_proj", tie))
    tensors = load_file(path / "model.safetensors")
    metadata = _metadata(path)
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.0.mlp.down_proj.")}
    save_file(kept, path / "model.safetensors", metadata)
    with pytest.raises(PalettizedCheckpointError, match=message):
        AUTO["llama"].from_pretrained(path)


def test_real_tie_reloads_as_one_tensor(palettized_checkpoint):
    path, model = palettized_checkpoint
    loaded = AUTO["llama"].from_pretrained(path)
    assert loaded.lm_head.tied_source is loaded.model.embed_tokens
    assert not any(k.startswith("lm_head") for k in load_file(path / "model.safetensors"))
    assert torch.equal(_logits(loaded), _logits(model))


def test_palettized_state_dict_without_files_says_how_to_load_it(palettized_checkpoint):
    """from_pretrained(None, config=..., state_dict=...) gives the loader no files whose headers it can check."""
    path, model = palettized_checkpoint
    config = AutoConfig.from_pretrained(path)
    with pytest.raises(PalettizedCheckpointError, match=r"loads from its saved directory.*no weight files"):
        LlamaForCausalLM.from_pretrained(None, config=config, state_dict=model.state_dict())
    loaded = AUTO["llama"].from_pretrained(path)  # the way the message gives
    loaded.load_state_dict(model.state_dict())
    assert torch.equal(_logits(loaded), _logits(model))


def _shard(path: Path) -> None:
    """Split model.safetensors into two shards named by an index."""
    tensors = load_file(path / "model.safetensors")
    metadata = _metadata(path)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, path / file, metadata)
    (path / "model.safetensors").unlink()
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_weight_files_outside_the_checkpoint_are_refused(palettized_checkpoint, tmp_path, monkeypatch, where):
    """12.11: an index naming ../x or an absolute path, or a symlink leaving the directory."""
    path, model = palettized_checkpoint
    _shard(path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    moved = outside / "model-00002-of-00002.safetensors"
    shutil.move(path / "model-00002-of-00002.safetensors", moved)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    if where == "symlink":
        os.symlink(moved, path / "model-00002-of-00002.safetensors")
    else:
        name = "../elsewhere/model-00002-of-00002.safetensors" if where == "parent" else str(moved)
        index["weight_map"] = {k: (name if "00002" in v else v) for k, v in index["weight_map"].items()}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PalettizedCheckpointError, match="lies outside the checkpoint directory"):
        AUTO["llama"].from_pretrained(path)
    if where == "symlink":  # the documented opt-out (for a checkpoint assembled from links on purpose)
        monkeypatch.setenv(ALLOW_OUTSIDE_ENV, "1")
        assert torch.equal(_logits(AUTO["llama"].from_pretrained(path)), _logits(model))


def test_shard_index_naming_a_file_with_a_nul_byte_names_the_index(palettized_checkpoint):
    path, _ = palettized_checkpoint
    _shard(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v.replace("00002-", "00002\0-") for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PalettizedCheckpointError, match=r"index\.json: weight_map values must be file names"):
        AUTO["llama"].from_pretrained(path)


def test_shard_that_is_not_a_regular_file_is_refused_unopened(palettized_checkpoint):
    """A FIFO blocks whoever opens it for reading until a writer comes: it is refused, naming the index entry,
    before anything opens it. A writer thread stands by so that an open would end (reading nothing) instead of
    hanging the test."""
    path, _ = palettized_checkpoint
    _shard(path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    done = threading.Event()

    def unblock_readers() -> None:
        while not done.wait(0.05):
            try:
                os.close(os.open(shard, os.O_WRONLY | os.O_NONBLOCK))  # fails (ENXIO) while no reader waits
            except OSError:
                pass

    writer = threading.Thread(target=unblock_readers, daemon=True)
    writer.start()
    try:
        with pytest.raises(
            PalettizedCheckpointError,
            match=r"index\.json: weight_map entry 'model-00002-of-00002\.safetensors': .* is not a regular file",
        ):
            AUTO["llama"].from_pretrained(path)
    finally:
        done.set()
        writer.join()


def test_malformed_shard_index_names_the_file(palettized_checkpoint):
    """12.8: a shard index that is not JSON, or has no weight_map."""
    path, _ = palettized_checkpoint
    _shard(path)
    valid = json.loads((path / "model.safetensors.index.json").read_text())
    for text in ("{not json", json.dumps({"metadata": {}})):
        (path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(
            PalettizedCheckpointError, match=r"model\.safetensors\.index\.json: not a valid shard index"
        ):
            AUTO["llama"].from_pretrained(path)
    # without its metadata transformers failed with a bare KeyError: 'metadata'
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": valid["weight_map"]}))
    with pytest.raises(PalettizedCheckpointError, match=r"index\.json: no 'metadata' object beside its weight_map"):
        AUTO["llama"].from_pretrained(path)


def test_data_bytes_changed_after_saving_are_detected(palettized_checkpoint):
    """12.13: a CRC-32 per palettized tensor, checked on load; files of format version 1 written without checksums
    still load."""
    path, model = palettized_checkpoint
    blob = bytearray((path / "model.safetensors").read_bytes())
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    begin, _ = header["model.layers.0.mlp.up_proj.weight_indices"]["data_offsets"]
    blob[8 + header_len + begin] ^= 0b1  # the lowest bit of the first index
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(PalettizedCheckpointError, match=r"up_proj\.weight_indices: checksum .* does not match"):
        AUTO["llama"].from_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    save_file(
        tensors, path / "model.safetensors", {"format": "pt", "dkm_format": "palettized", "dkm_format_version": "1"}
    )
    _as_version_1(path)
    old_style = AUTO["llama"].from_pretrained(path)  # no checksums recorded: loads (with the flipped bit)
    assert not torch.equal(_logits(old_style), _logits(model))


def test_a_palettized_checkpoint_loads_into_its_base_model_and_the_base_into_a_head(tiny_dir, tmp_path):
    """As with dense checkpoints, the weights of a model with a head load into its base model and back
    (transformers maps keys through `base_model_prefix`); config.json's records are mapped the same way."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir("bert"), dkm_config=DKMConfig(bits=3))
    dkm_hf.palettize(model.eval())
    model.save_pretrained(tmp_path / "head")
    inputs = tiny_inputs("bert")
    base = AutoModel.from_pretrained(tmp_path / "head").eval()
    assert {n for n, _ in dkm_hf.palettized_modules(base)} == {
        n.removeprefix("bert.") for n, _ in dkm_hf.palettized_modules(model) if n.startswith("bert.")
    }
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    headed = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3).eval()
    assert {n for n, _ in dkm_hf.palettized_modules(headed)} == {
        f"bert.{n}" for n, _ in dkm_hf.palettized_modules(base)
    }
    with torch.no_grad():
        assert torch.equal(headed.bert(**inputs).last_hidden_state, base(**inputs).last_hidden_state)


@torch.no_grad()
def test_a_palettized_checkpoint_loads_into_a_model_without_one_of_its_layers(tiny_dir, tmp_path):
    """A sequence classifier's pooler is palettized; token classification and `add_pooling_layer=False` build BERT
    without one. As with the dense checkpoint, the pooler's tensors are unexpected keys and the rest loads palettized
    (before: refused, "config.json lists palettized module 'bert.pooler.dense', which this model does not have")."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_dir("bert"), dkm_config=DKMConfig(bits=3, weight_threshold=0)
    )
    dkm_hf.palettize(model.eval()).save_pretrained(tmp_path / "head")
    assert "bert.pooler.dense" in dict(dkm_hf.palettized_modules(model))
    encoder = {n for n, _ in dkm_hf.palettized_modules(model) if n.startswith("bert.") and "pooler" not in n}
    inputs = tiny_inputs("bert")
    for load, prefix, head in (  # the token classifier has the sequence classifier's name and shape: it loads too
        (lambda p: AutoModelForTokenClassification.from_pretrained(p), "bert.", {"classifier"}),
        (lambda p: AutoModel.from_pretrained(p, add_pooling_layer=False), "", set()),
    ):
        other = load(tmp_path / "head").eval()
        expected = {prefix + n.removeprefix("bert.") for n in encoder} | head
        assert {n for n, _ in dkm_hf.palettized_modules(other)} == expected
        hidden = (other.bert if prefix else other)(**inputs).last_hidden_state
        assert torch.equal(hidden, model.bert(**inputs).last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("lut", ["per_row", "per_channel_scale"])
def test_a_model_with_fewer_layers_loads_the_ones_it_has_and_names_the_rest(tmp_path, caplog, lut):
    """GPT-2 (Conv1D: stored transposed) palettized with two blocks, loaded with one: the left-out block's records
    are neither laid out nor checked (their geometry was computed untransposed: per-row LUTs and scales were refused
    as the wrong shape), its tensors are unexpected keys, and a warning names them (a layer the model names
    otherwise would keep its initial weight)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "dense"
    )
    per_row = {"granularity": "per_grouped_channel", "group_size": 1}
    extra = {"per_channel_scale": True} if lut == "per_channel_scale" else per_row
    config = DKMConfig(bits=3, weight_threshold=0, modules_to_not_convert=["wte", "wpe", "lm_head"], **extra)
    model = dkm_hf.palettize(GPT2LMHeadModel.from_pretrained(tmp_path / "dense", dkm_config=config).eval())
    model.save_pretrained(tmp_path / "palettized")
    with caplog.at_level(logging.WARNING, logger="dkm_hf"):
        short = GPT2LMHeadModel.from_pretrained(tmp_path / "palettized", n_layer=1).eval()
    assert {n for n, _ in dkm_hf.palettized_modules(short)} == {
        n for n, _ in dkm_hf.palettized_modules(model) if ".h.0." in n
    }
    assert "transformer.h.1.attn.c_attn" in caplog.text and "are not weights of this GPT2LMHeadModel" in caplog.text
    for name in ("attn.c_attn", "mlp.c_proj"):
        a, b = short.get_submodule(f"transformer.h.0.{name}"), model.get_submodule(f"transformer.h.0.{name}")
        assert torch.equal(a.weight, b.weight)


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_a_palettized_causal_lm_loads_into_another_head(tiny_dir, tmp_path, tie):
    """As a dense checkpoint does, a palettized causal LM loads into the sequence-classification class of its
    architecture: the backbone palettized and equal to the saved one, the LM head's tensors unexpected, the new head
    initialised (before: refused naming lm_head, tied or not)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    dense = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), tie_word_embeddings=tie)
    dense.save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=DKMConfig(bits=4, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "palettized")
    inputs = tiny_inputs("llama")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "palettized", num_labels=3)
    backbone = AutoModel.from_pretrained(tmp_path / "palettized")
    names = {name for name, _ in dkm_hf.palettized_modules(classifier)}
    assert "model.layers.0.mlp.up_proj" in names and not any(n.startswith(("lm_head", "score")) for n in names)
    torch.testing.assert_close(classifier.model(**inputs).last_hidden_state, backbone(**inputs).last_hidden_state)
    torch.testing.assert_close(backbone(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
    assert classifier(**inputs).logits.shape == (2, 3)


def test_training_checkpoint_with_centroids_the_config_does_not_cluster_is_refused(tiny_dir, tmp_path):
    """A training checkpoint whose config.json was edited to leave a clustered weight out would load that weight as
    a dense layer (its centroids unexpected keys): refused naming the centroids. Loading into the base model (the
    head's centroids are not the model's) still works."""
    from transformers import AutoModel, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), dkm_config=DKMConfig(bits=4, weight_threshold=0), tie_word_embeddings=False
    )
    model.save_pretrained(tmp_path / "out")
    assert len(dkm_hf.dkm_modules(AutoModel.from_pretrained(tmp_path / "out"))) == len(dkm_hf.dkm_modules(model)) - 1
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.mlp.up_proj"]
    path.write_text(json.dumps(config))
    with pytest.raises(
        PalettizedCheckpointError, match=r"centroids of 1 weight.*model.layers.0.mlp.up_proj.centroids"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_tied_head_without_a_record_or_a_tensor_shares_the_palettized_embedding(tiny_dir, tmp_path):
    """The tied LM head's record removed from config.json: the head has no tensor in the files either, as a base
    model's checkpoint loaded into a head class, and the model ties it: it shares the palettized embedding (an
    AttributeError from transformers' tie_weights first, then a refusal). A head stored in the files is not tied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=4, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    assert config["quantization_config"]["modules"].pop("lm_head") == {"tied_to": "model.embed_tokens"}
    path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.tied_source is loaded.model.embed_tokens
    x = torch.randint(0, 99, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
