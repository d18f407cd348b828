"""The checks that pick the checkpoint a run resumes from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dkm_hf.integrations.resume import checkpoint_problem, newest_complete_checkpoint


def _complete(path, step: int):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name():
    """checkpoint-10 is newer than checkpoint-9 (steps compare as numbers)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for step in (2, 9, 10):
            _complete(Path(d) / f"checkpoint-{step}", step)
        assert newest_complete_checkpoint(d) == str(Path(d) / "checkpoint-10")


@pytest.mark.parametrize("step", [-1, True, "3", None])
def test_a_trainer_state_whose_step_is_no_step_count_is_not_resumed(tmp_path, step):
    path = _complete(tmp_path / "checkpoint-3", 3)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert "is not a trainer state" in checkpoint_problem(path)


def test_an_adapter_checkpoint_without_adapter_weights_is_not_resumed(tmp_path):
    path = tmp_path / "checkpoint-3"
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert "adapter_config.json but no adapter weights" in checkpoint_problem(path)
    save_file({"w": torch.zeros(2)}, str(path / "adapter_model.safetensors"))
    assert checkpoint_problem(path) is None
