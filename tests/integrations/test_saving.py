"""Atomic saves: a save killed at any point leaves the old or the new checkpoint, whole, at the target path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import dkm_hf
from dkm_hf.integrations import saving

logging.set_verbosity_error()
logging.disable_progress_bar()

# Where the child process kills itself (SIGKILL unless noted), in the order a save passes them.
KILL_POINTS = {
    "writing": "after the first weight shard of the new checkpoint is written",
    "carry_over": "while the old directory's other files are linked into the new one",
    "model_card": "while the model card is written",
    "before_exchange": "right before the atomic exchange",
    "after_exchange": "right after the exchange, before the old copy is removed",
    "cleanup": "halfway through removing the old copy",
    "sigint_after_exchange": "Ctrl-C (KeyboardInterrupt) right after the exchange",
}

CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM
    import dkm_hf
    from dkm_hf.integrations import model_card, saving

    target, source, point = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(source)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "writing":
        real = modeling_utils.safe_save_file
        def save(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            die()
        modeling_utils.safe_save_file = save
    elif point == "carry_over":
        real_link = saving._link_or_copy
        def link(a, b):
            real_link(a, b)
            die()
        saving._link_or_copy = link
    elif point == "model_card":
        def card(*args, **kwargs):
            die()
        import dkm_hf.integrations.transformers_patches as patches
        patches.write_model_card = card
    elif point in ("before_exchange", "after_exchange", "sigint_after_exchange", "cleanup"):
        real_exchange = saving.exchange
        def exchange(a, b):
            if point == "before_exchange":
                die()
            done = real_exchange(a, b)
            if point == "after_exchange":
                die()
            if point == "sigint_after_exchange":
                raise KeyboardInterrupt
            if point == "cleanup":
                files = sorted(os.listdir(a))
                os.remove(os.path.join(a, files[0]))
                die()
            return done
        saving.exchange = exchange
    model.save_pretrained(target, max_shard_size="4KB")
    print("saved")
    """
)


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(12).view(2, 6)).logits


def _palettized(dense: Path, bits: int):
    return dkm_hf.palettize(
        AutoModelForCausalLM.from_pretrained(dense, dkm_config=dkm_hf.DKMConfig(bits=bits, weight_threshold=0))
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("saving")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)).save_pretrained(
        root / "dense"
    )
    old, new = _palettized(root / "dense", 2), _palettized(root / "dense", 3)
    old.save_pretrained(root / "old", max_shard_size="4KB")
    (root / "old" / "tokenizer.json").write_text("{}")
    new.save_pretrained(root / "new")
    return root, _logits(old), _logits(new)


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if ".dkm-" in p.name)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_save_leaves_a_whole_checkpoint(checkpoints, tmp_path, point):
    root, old_logits, new_logits = checkpoints
    target = tmp_path / "ckpt"
    shutil.copytree(root / "old", target)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(target), str(root / "new"), point],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "saved" not in proc.stdout, KILL_POINTS[point]  # the save really was interrupted
    logits = _logits(AutoModelForCausalLM.from_pretrained(target))
    expected = new_logits if point in ("after_exchange", "cleanup", "sigint_after_exchange") else old_logits
    assert torch.equal(logits, expected), KILL_POINTS[point]
    assert (target / "tokenizer.json").read_text() == "{}"
    # the next save removes what the killed one left behind
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(target)
    assert _hidden(target) == []
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), new_logits)
    assert not list(target.glob("model-*"))  # no stale shard of the old checkpoint


def test_saving_into_the_working_directory_keeps_it(checkpoints, tmp_path, monkeypatch):
    root, _, new_logits = checkpoints
    target = tmp_path / "cwd"
    shutil.copytree(root / "old", target)
    monkeypatch.chdir(target)
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(".")
    assert Path(os.getcwd()).resolve() == target.resolve() and target.is_dir()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(".")), new_logits)
    assert not list(target.glob("model-*")) and (target / "tokenizer.json").exists()
    assert _hidden(target) == []


def test_without_an_atomic_exchange_files_are_replaced_one_by_one(checkpoints, tmp_path, monkeypatch):
    root, _, new_logits = checkpoints
    target = tmp_path / "ckpt"
    shutil.copytree(root / "old", target)
    monkeypatch.setattr(saving, "exchange", lambda a, b: False)
    AutoModelForCausalLM.from_pretrained(root / "new").save_pretrained(target)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), new_logits)
    assert not list(target.glob("model-*")) and _hidden(target) == []


# -- values the loader would refuse ----------------------------------------------------------------------------------
def test_a_lut_that_overflows_float16_is_not_saved(tmp_path):
    """A weight of 1e5 has a centroid of 1e5, which a float16 LUT stores as inf: the save fails naming the tensor,
    before anything is written, instead of writing a checkpoint its own loader refuses."""
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with torch.no_grad():
        dense.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5
    dense.save_pretrained(tmp_path / "dense")
    model = _palettized(tmp_path / "dense", 4)
    with pytest.raises(dkm_hf.PalettizedCheckpointError, match=r"mlp\.c_fc\.weight_lut: 1 value\(s\) are NaN or inf"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    config = dkm_hf.DKMConfig(bits=4, weight_threshold=0, lut_dtype="float32")
    wide = dkm_hf.palettize(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=config))
    wide.save_pretrained(tmp_path / "out")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), _logits(wide))
