"""FSDP2 (`fully_shard` per decoder block, gloo on CPU): two processes train a tiny Llama with tied embeddings to the
same losses, weights and centroids as one process with the same global batch; a distributed checkpoint resumes
exactly; the palettized checkpoint is written once and keeps the tie. (DDP: test_trainer.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM

import dkm_hf

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fsdp_train.py")


def _run(args: list[str], processes: int, port: int) -> None:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, SCRIPT, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_fsdp2_matches_one_process_resumes_and_saves_once(tmp_path):
    model = save_tiny("llama", tmp_path / "llama")
    single, sharded, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    _run([model, str(single), "4"], 1, 0)
    _run([model, str(sharded), "4"], 2, 29561)
    _run([model, str(resumed), "4", str(sharded / "checkpoint-2")], 2, 29562)
    one, two, again = (json.loads((p / "result.json").read_text()) for p in (single, sharded, resumed))
    assert two["world"] == 2 and one["world"] == 1
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    assert again["losses"] == two["losses"][2:]  # resumed from step 2: the same steps 3 and 4, exactly
    for key, value in one["state"].items():
        tolerance = {"rtol": 1e-4, "atol": 1e-3} if key.endswith("weight") else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(torch.tensor(two["state"][key]), torch.tensor(value), **tolerance)
        assert torch.equal(torch.tensor(again["state"][key]), torch.tensor(two["state"][key])), key
    assert sorted(p.name for p in (sharded / "final").iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(sharded / "final")
    assert reloaded.lm_head.tied_source is reloaded.model.embed_tokens
    assert dkm_hf.palettized_modules(reloaded) and not dkm_hf.dkm_modules(reloaded)
