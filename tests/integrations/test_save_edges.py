"""Saving and loading where the directory holds more than one checkpoint: other variants and files of the user's,
mounted file systems, another owner, a failed write, a `state_dict=` argument, and a config given apart from the
directory's."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from conftest import tiny_inputs
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.utils import logging

import dkm_hf
from dkm_hf.integrations import saving

logging.set_verbosity_error()
logging.disable_progress_bar()


def _models(tiny_dir):
    from conftest import tiny_inputs

    dense = tiny_dir("llama")
    dkm = AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=4, weight_threshold=0))
    return dense, dkm, tiny_inputs("llama")


@torch.no_grad()
def _logits(model, inputs):
    return model.eval()(**inputs).logits


def test_a_save_leaves_other_variants_and_the_users_own_weight_files(tiny_dir, tmp_path):
    """A palettized save replaces the weight files of its own variant only, as transformers does (before: every
    `model*.safetensors`, another variant's and a user's `model-ema.safetensors`, was deleted)."""
    dense, dkm, inputs = _models(tiny_dir)
    out = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(dense).save_pretrained(out, variant="fp16")
    (out / "model-ema.safetensors").write_bytes(b"the user's own")
    AutoModelForCausalLM.from_pretrained(dense).save_pretrained(out)  # the default variant's old weights
    dkm_hf.palettize(dkm).save_pretrained(out)
    names = set(os.listdir(out))
    assert {"model.fp16.safetensors", "model-ema.safetensors", "model.safetensors"} <= names
    assert (out / "model-ema.safetensors").read_bytes() == b"the user's own"
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), inputs), _logits(dkm, inputs))


def test_the_mount_table_finds_a_mount_point_inside_the_target(tmp_path):
    table = tmp_path / "mountinfo"
    inside, outside = tmp_path / "out dir" / "data", tmp_path / "out dir2"
    escaped, escaped_outside = (str(p).replace(" ", "\\040") for p in (inside, outside))  # as mountinfo writes them
    table.write_text(
        f"36 35 98:0 / {escaped} rw - tmpfs tmpfs rw\n37 35 98:0 / {escaped_outside} rw - tmpfs tmpfs rw\n"
    )
    assert saving._holds_mount(tmp_path / "out dir", str(table))
    assert not saving._holds_mount(tmp_path / "out dir2", str(table))  # the target itself is a mount point: EXDEV
    assert not saving._holds_mount(tmp_path / "elsewhere", str(table))


def test_a_directory_holding_a_mount_point_or_of_another_owner_is_saved_in_place(tiny_dir, tmp_path, monkeypatch):
    """An exchange would move a mounted file system into the old copy and remove its files, or give the directory
    this process's owner: the save replaces the files inside the directory instead, leaving the rest alone."""
    dense, dkm, inputs = _models(tiny_dir)
    pal = dkm_hf.palettize(dkm)
    for reason in ("mount", "owner"):
        out = tmp_path / reason
        AutoModelForCausalLM.from_pretrained(dense).save_pretrained(out)
        (out / "data").mkdir()
        (out / "data" / "precious.txt").write_text("kept")
        inode = os.stat(out).st_ino
        with monkeypatch.context() as patch:
            if reason == "mount":
                patch.setattr(saving, "_holds_mount", lambda target, table=None: target == out)
            else:
                patch.setattr(os, "geteuid", lambda: os.stat(out).st_uid + 1)  # neither the owner nor root
            patch.setattr(saving, "exchange", lambda a, b: pytest.fail("exchanged"))
            pal.save_pretrained(out)
        assert os.stat(out).st_ino == inode
        assert (out / "data" / "precious.txt").read_text() == "kept"
        torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), inputs), _logits(pal, inputs))


@pytest.mark.parametrize("kind", ["training", "palettized"])
def test_a_save_that_fails_writing_leaves_the_previous_checkpoint(tiny_dir, tmp_path, monkeypatch, kind):
    """Out of space halfway: the directory still loads as the previous checkpoint (before: a training-format save
    went in place, and the old checkpoint was gone)."""
    dense, dkm, inputs = _models(tiny_dir)
    out = tmp_path / "out"
    dkm_hf.palettize(AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=2))).save_pretrained(
        out
    )
    before = _logits(AutoModelForCausalLM.from_pretrained(out), inputs)
    model = dkm if kind == "training" else dkm_hf.palettize(dkm)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(out)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), inputs), before)


def test_a_state_dict_argument_is_what_the_checksums_cover(tiny_dir, tmp_path):
    """`save_pretrained(state_dict=...)` of a palettized model: the checksums are the given tensors' (before: the
    model's buffers', so the checkpoint failed to load as 'altered'); a state dict without a LUT is refused before
    anything is written."""
    _, dkm, inputs = _models(tiny_dir)
    pal = dkm_hf.palettize(dkm)
    state = pal.state_dict()
    key = next(k for k in state if k.endswith("weight_lut") and ".layers." in k)
    state[key] = state[key] * 1.01
    pal.save_pretrained(tmp_path / "edited", state_dict=dict(state))  # transformers empties the dict it is given
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    torch.testing.assert_close(reloaded.state_dict()[key], state[key])
    lut = state.pop(key)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=f"{key} is missing"):
        pal.save_pretrained(tmp_path / "partial", state_dict=dict(state))
    assert not (tmp_path / "partial").exists()
    state[key] = lut.float()  # a LUT its loader would refuse (float16 expected): refused at the save
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=re.escape(key)):
        pal.save_pretrained(tmp_path / "float32", state_dict=dict(state))
    assert not (tmp_path / "float32").exists()


def test_a_state_dict_argument_belongs_to_its_own_save(tiny_dir, tmp_path):
    """`state_dict=` reaches the quantizer's hook in the context of its own call: a save that returned before the hook
    (transformers logs that the path is a file) left it on the quantizer, and the next plain save wrote it instead of
    the model; two threads saving one model with their own state dicts wrote each other's (the saves now take turns,
    each recording its own save id)."""
    import threading

    _, dkm, inputs = _models(tiny_dir)
    pal = dkm_hf.palettize(dkm)
    state = pal.state_dict()
    edited = {k: v.flip(1) if k.endswith("weight_lut") else v for k, v in state.items()}
    (tmp_path / "a_file").touch()
    pal.save_pretrained(tmp_path / "a_file", state_dict=dict(edited))  # nothing saved
    pal.save_pretrained(tmp_path / "plain")
    pal.save_pretrained(tmp_path / "positional", True, dict(edited))  # (save_directory, is_main_process, state_dict)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), inputs), _logits(pal, inputs))

    expected = {}
    for name, given in (("own", state), ("edited", edited)):
        copy = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
        copy.load_state_dict(given)
        expected[name] = _logits(copy, inputs)
    assert not torch.equal(expected["own"], expected["edited"])
    positional = AutoModelForCausalLM.from_pretrained(tmp_path / "positional")
    assert torch.equal(_logits(positional, inputs), expected["edited"])  # before: the model's own state was saved
    barrier, errors = threading.Barrier(2), []

    def save(name, given):
        barrier.wait()
        try:
            pal.save_pretrained(tmp_path / name, state_dict=dict(given))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=save, args=pair) for pair in (("own", state), ("edited", edited))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for name in expected:
            assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / name), inputs), expected[name])


def test_a_save_over_a_checkpoint_without_posix_owners(tiny_dir, tmp_path, monkeypatch):
    """Windows has no os.geteuid: a second save into one directory asked for the owner to keep and failed (before:
    AttributeError); the first checkpoint is replaced by the second."""
    _, dkm, inputs = _models(tiny_dir)
    dkm.save_pretrained(tmp_path / "out")
    pal = dkm_hf.palettize(dkm)
    for name in ("geteuid", "getegid", "getgroups"):
        monkeypatch.delattr(os, name)
    pal.save_pretrained(tmp_path / "out")
    monkeypatch.undo()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs), _logits(pal, inputs))


def test_palettized_files_never_load_under_a_config_that_does_not_declare_them(tiny_dir, tmp_path):
    """The path as a keyword, and a `config=` without the DKM quantization_config, are refused like the positional
    path with an edited config.json (before: every clustered layer loaded with random weights)."""
    dense, dkm, _ = _models(tiny_dir)
    out = tmp_path / "out"
    dkm_hf.palettize(dkm).save_pretrained(out)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="config=` given"):
        AutoModelForCausalLM.from_pretrained(out, config=AutoConfig.from_pretrained(dense))
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in os.listdir(out):
        (edited / name).write_bytes((out / name).read_bytes())
    (edited / "config.json").write_bytes((Path(dense) / "config.json").read_bytes())
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="does not declare it"):
        LlamaForCausalLM.from_pretrained(pretrained_model_name_or_path=edited)
    # an Auto class passes the config it read as config=: the message names config.json, as the model class's does
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):
        with pytest.raises(dkm_hf.PalettizedCheckpointError, match=f"^{edited}/config.json: .*config.json$"):
            cls.from_pretrained(edited)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="config=` given"):  # read from there, then edited
        config = AutoConfig.from_pretrained(out)
        del config.quantization_config
        AutoModelForCausalLM.from_pretrained(out, config=config)
    # the files re-saved without dkm_hf's metadata as well: transformers loaded every clustered layer at random
    from safetensors.torch import load_file, save_file

    save_file(load_file(edited / "model.safetensors"), edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"hold dkm_hf palettized tensors \(\S+_lut, "):
        AutoModelForCausalLM.from_pretrained(edited)
    assert dkm_hf.palettized_modules(AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path=out))


def test_a_plain_checkpoint_with_tensors_named_lut_and_indices_loads(tmp_path):
    """Only what looks like a palettized checkpoint (a float (groups, 2**bits, d) LUT beside flat uint8 indices) is
    refused without dkm_hf's metadata; a model's own `color_lut` / `color_indices`, or the tensors of a config that
    declares another quantization method transformers runs, are transformers' to load (before: refused as dkm_hf's);
    under a method transformers does not know (it loads the model dense) they are refused still."""
    from transformers import LlamaConfig
    from transformers.modeling_utils import PreTrainedModel

    class Palette(PreTrainedModel):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.color_lut = torch.nn.Parameter(torch.randn(4, 3))
            self.register_buffer("color_indices", torch.arange(4))
            self.post_init()

    torch.manual_seed(0)
    Palette(LlamaConfig()).save_pretrained(tmp_path / "plain")
    assert torch.equal(Palette.from_pretrained(tmp_path / "plain").color_indices, torch.arange(4))
    # palettized-looking tensors, but a config of another quantization method: not dkm_hf's to judge
    from safetensors.torch import save_file

    lut, indices = torch.zeros(1, 16, 1, dtype=torch.float16), torch.zeros(8, dtype=torch.uint8)
    state = {"layer.weight_lut": lut, "layer.weight_indices": indices}
    save_file(state, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    from dkm_hf.integrations.preflight import preflight

    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"hold dkm_hf palettized tensors \(layer.weight_lut"):
        preflight(tmp_path / "plain")
    config["quantization_config"] = {"quant_method": "my_lut_method"}  # unknown: transformers loads it as dense
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"hold dkm_hf palettized tensors"):
        preflight(tmp_path / "plain")
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    preflight(tmp_path / "plain")  # nothing refused: fp8's quantizer loads it


def test_an_untied_checkpoint_loaded_into_a_tying_config_loads_as_stored(tmp_path):
    """A palettized checkpoint that stores the head and the embedding apart, loaded with a config that ties them (T5
    v1.1's config ties them whatever config.json says): it was refused; it loads as stored, as transformers loads a
    dense checkpoint whose sides differ."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=dkm_hf.DKMConfig(weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pal", tie_word_embeddings=True)
    assert reloaded.lm_head.tied_source is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_new_weights_in_a_trainer_checkpoint_make_its_trainer_state_stale(tiny_dir, tmp_path, monkeypatch):
    """A second run into the same output_dir, killed after writing its weights into the first run's checkpoint-4
    and before its trainer_state.json: the first run's state is gone with its weights, so resume_from_checkpoint=True
    skips checkpoint-4 (before: the second run's weights resumed with the first run's optimizer and state), with
    the system's exchange or without it."""
    from dkm_hf.integrations.resume import newest_complete_checkpoint

    _, dkm, _ = _models(tiny_dir)
    for path in ("exchange", "in place"):
        run = tmp_path / path
        for step in (2, 4):  # the first run's complete checkpoints
            dkm.save_pretrained(run / f"checkpoint-{step}")
            (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if path == "in place":
            monkeypatch.setattr(saving, "exchange", lambda a, b: False)
        dkm.save_pretrained(run / "checkpoint-4")  # the second run's weights; killed before its state
        assert not (run / "checkpoint-4" / "trainer_state.json").exists()
        assert newest_complete_checkpoint(run) == str(run / "checkpoint-2")
        dkm.save_pretrained(run / "elsewhere")
        (run / "elsewhere" / "trainer_state.json").write_text("{}")
        dkm.save_pretrained(run / "elsewhere")  # not a Trainer checkpoint: the file is the user's
        assert (run / "elsewhere" / "trainer_state.json").exists()


def test_a_trainer_checkpoint_is_saved_in_place_keeping_what_other_ranks_write(tiny_dir, tmp_path, monkeypatch):
    """Every rank writes its RNG state into checkpoint-N while the main one saves the model (no barrier between):
    the save goes in place, so a file written meanwhile stays (before: one written between the carry-over and the
    exchange went with the old copy)."""
    _, dkm, inputs = _models(tiny_dir)
    target = tmp_path / "run" / "checkpoint-2"
    real = saving._replace_files

    def replace(staged, directory, weights):
        torch.save({"rng": 1}, directory / "rng_state_1.pth")  # another rank, meanwhile
        return real(staged, directory, weights)

    monkeypatch.setattr(saving, "_replace_files", replace)
    monkeypatch.setattr(saving, "exchange", lambda a, b: pytest.fail("exchanged"))
    for _ in range(2):  # a new checkpoint folder, then one that exists
        dkm.save_pretrained(target)
        assert (target / "rng_state_1.pth").exists()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(target), inputs), _logits(dkm, inputs))


def test_a_config_directory_with_a_subfolder_is_read_where_transformers_reads_it(tiny_dir, tmp_path):
    """`from_pretrained(parent, subfolder="sub", config=parent)`: transformers reads parent/sub/config.json, and so
    does the check (before: parent/config.json, a dense one here, and a palettized checkpoint refused)."""
    dense, dkm, inputs = _models(tiny_dir)
    parent = tmp_path / "parent"
    dkm_hf.palettize(dkm).save_pretrained(parent / "sub")
    (parent / "config.json").write_bytes((Path(dense) / "config.json").read_bytes())
    model = LlamaForCausalLM.from_pretrained(parent, subfolder="sub", config=str(parent))  # Auto* loads it itself
    assert dkm_hf.palettized_modules(model)
    torch.testing.assert_close(_logits(model, inputs), _logits(dkm, inputs))


def test_misuses_are_refused_by_name_and_write_nothing(tiny_dir, tmp_path):
    """A model half palettized (one block palettized, the rest still DKM) has no single format to save: refused
    before anything is written, the folder's own file kept. A DKMConfig read from a palettized checkpoint describes
    that checkpoint and cannot compress a dense one; DKMCallback on a model without DKM weights is refused."""
    from transformers import Trainer, TrainingArguments

    dense = tiny_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=2, weight_threshold=0))
    dkm_hf.palettize(model.model.layers[0].mlp)
    assert dkm_hf.dkm_modules(model) and dkm_hf.palettized_modules(model)
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="both DKM and palettized modules; palettize"):
        model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    dkm_hf.palettize(model).save_pretrained(tmp_path / "palettized")
    saved = AutoConfig.from_pretrained(tmp_path / "palettized").quantization_config
    with pytest.raises(ValueError, match="describes a saved palettized checkpoint"):
        AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig.from_dict(saved))

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1)
    ids = torch.randint(0, 64, (4, 8))
    data = [{"input_ids": i, "labels": i} for i in ids]
    trainer = Trainer(model=LlamaForCausalLM.from_pretrained(dense), args=args, train_dataset=data)
    trainer.add_callback(dkm_hf.DKMCallback())
    with pytest.raises(ValueError, match="DKMCallback needs a model with DKM modules"):
        trainer.train()


logging.set_verbosity_error()
logging.disable_progress_bar()


def test_a_save_of_a_variant_leaves_the_default_variants_weight_files(tiny_dir, tmp_path):
    """`save_pretrained(variant="v1")` replaces the v1 weight files only: the default variant's model.safetensors
    stays (the other direction, a default save beside a variant, is test_save_edges'); both load."""
    dense = tiny_dir("llama")
    out = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(dense).save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    dkm = AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=4, weight_threshold=0))
    dkm_hf.palettize(dkm).save_pretrained(out, variant="v1")
    names = set(os.listdir(out))
    assert {"model.safetensors", "model.v1.safetensors"} <= names
    assert (out / "model.safetensors").read_bytes() == before
    reloaded = AutoModelForCausalLM.from_pretrained(out, variant="v1")
    assert dkm_hf.palettized_modules(reloaded)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, dkm.eval()(**inputs).logits)


def test_a_mount_beside_the_target_whose_name_extends_it_is_not_inside(tmp_path):
    """`ckpt2` is not inside `ckpt` (a prefix of the path is not a parent); nor is the target itself a mount it
    holds."""
    from dkm_hf.integrations import saving

    table = tmp_path / "mountinfo"
    lines = [f"3{i} 35 98:0 / {str(p).replace(' ', chr(92) + '040')} rw - tmpfs tmpfs rw" for i, p in
             enumerate([tmp_path / "ckpt2", tmp_path / "out dir2"])]  # fmt: skip
    table.write_text("\n".join(lines) + "\n")
    assert not saving._holds_mount(tmp_path / "ckpt", str(table))
    assert not saving._holds_mount(tmp_path / "out dir", str(table))
    assert not saving._holds_mount(tmp_path / "out dir2", str(table))
    assert saving._holds_mount(tmp_path, str(table))


# Behaviours of dkm_hf/integrations/preflight.py no other test pinned (a mutation review)


def _lut_checkpoint(directory, k: int, quantization_config=None):
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    lut, indices = torch.zeros(1, k, 1, dtype=torch.float16), torch.zeros(8, dtype=torch.uint8)
    save_file({"layer.weight_lut": lut, "layer.weight_indices": indices}, directory / "model.safetensors")
    config = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_bitsandbytes_config_is_a_quantization_method_transformers_runs(tmp_path):
    """A bitsandbytes checkpoint (quant_method "bitsandbytes" with load_in_8bit / load_in_4bit, which transformers maps
    to bitsandbytes_8bit / _4bit) whose tensors look palettized is transformers' to load, not refused as dkm_hf's."""
    from dkm_hf.integrations.preflight import preflight

    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="hold dkm_hf palettized tensors"):
        preflight(_lut_checkpoint(tmp_path / "none", 16))
    for option in ("load_in_8bit", "load_in_4bit"):
        bnb = {"quant_method": "bitsandbytes", option: True}
        preflight(_lut_checkpoint(tmp_path / option, 16, bnb))  # transformers' bitsandbytes quantizer loads it


def test_a_lut_whose_entries_are_no_power_of_two_is_no_palettized_tensor(tmp_path):
    """A model's own (1, 3, 1) `*_lut` beside flat uint8 `*_indices` is not taken for a palettized checkpoint:
    dkm_hf's LUTs hold 2**bits entries."""
    from dkm_hf.integrations.preflight import preflight

    preflight(_lut_checkpoint(tmp_path / "three", 3))
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match="hold dkm_hf palettized tensors"):
        preflight(_lut_checkpoint(tmp_path / "four", 4))


def test_a_damaged_plain_checkpoint_is_left_to_transformers(tmp_path):
    """The files of a checkpoint that is not dkm_hf's (its config declares no dkm quantization) are transformers' to
    load or refuse: a damaged model.safetensors there is no dkm_hf PalettizedCheckpointError."""
    import json

    from dkm_hf.integrations.preflight import preflight

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    preflight(tmp_path / "plain")  # no error of dkm_hf's
