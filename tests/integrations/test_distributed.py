"""FSDP2 (`fully_shard` per decoder block, gloo on CPU): two processes train a tiny Llama with tied embeddings to the
same losses, weights and centroids as one process with the same global batch; a distributed checkpoint resumes
exactly; the palettized checkpoint is written once and keeps the tie. The same through DKMTrainer and accelerate's
FSDP2 plugin, configured in TrainingArguments (accelerate_fsdp_train.py). (DDP: test_trainer.)

Tolerances. One process and two sum the same terms in other orders: the global batch's gradient is one kernel's sum
over 8 rows against two sums over 4 rows added by the all-reduce, and the CPU's kernels block their sums by its vector
width (AVX2, AVX-512, AMX), so another machine reorders differently again. The bounds are in units of the magnitudes
summed (conftest.U), per quantity:
- losses: each is a mean of 72 next-token cross-entropies, each the log of a sum of 99 exponentials; reordering sums
  of positive terms moves them by at most (n - 1) U relative, so by (72 + 99) U per step, 4.1e-5 over 4 steps.
- centroids: each DKM iteration makes a centroid the weighted mean (A^T w) / (A^T 1) of its LUT's N weights with
  A >= 0, which reordering moves by at most 2 (N - 1) U max|w|; the largest LUT (the tied embedding) has N = 3168,
  2 iterations per step, 4 steps: 3.0e-3 x max|c|.
- weights: AdamW divides each gradient element by its own running RMS, so an element whose gradient is near the
  rounding noise of its sum takes a step of any size up to lr: no bound follows from the reordering, only one
  relative to the size of the training update. Measured (the largest |difference| / the largest update of a tensor)
  between 1 and 2 processes and between ATen / MKL / oneDNN kernels limited to SSE4 and their AVX2 builds
  (ATEN_CPU_CAPABILITY=default, MKL_ENABLE_INSTRUCTIONS=SSE4_2, ONEDNN_MAX_CPU_ISA=SSE41), in every pairing: at most
  4.4e-3 (centroids 1.1e-4 x max|c|, losses 2.1e-7); the bound is 5e-2, ten times that. Training bugs (a rank on
  other data, gradients not averaged) change the update by its own size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import TINY, U, assert_within, free_port, save_tiny, weight_rounding
from transformers import AutoModelForCausalLM

import dkm_hf

TESTS = os.path.dirname(os.path.dirname(__file__))
SCRIPT = os.path.join(TESTS, "fsdp_train.py")


STEPS, TOKENS, VOCAB, ITERS, LARGEST_LUT = 4, 8 * 9, 99, 2, 99 * 32
LOSS_BOUND = STEPS * (TOKENS + VOCAB) * U
CENTROID_BOUND = STEPS * ITERS * 2 * LARGEST_LUT * U
WEIGHT_BOUND = 5e-2  # of the largest update of the tensor (see the module docstring)


def _assert_same_training(two: dict, one: dict, initial: dict[str, torch.Tensor]) -> None:
    """Two processes trained the model one process trained, within the reordering bounds above."""
    losses, expected = torch.tensor(two["losses"]), torch.tensor(one["losses"])
    assert_within(losses, expected, LOSS_BOUND, expected.abs().max().item(), "losses")
    for key, value in one["state"].items():
        value = torch.tensor(value)
        if key.endswith("centroids"):
            assert_within(two["state"][key], value, CENTROID_BOUND, value.abs().max().item(), key)
        else:
            update = (value - initial[key]).abs().max().item()
            assert update > 0, key
            assert_within(two["state"][key], value, WEIGHT_BOUND, update, key, weight_rounding(value, STEPS))


def _run(args: list[str], processes: int, script: str = SCRIPT) -> None:
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_fsdp2_matches_one_process_resumes_and_saves_once(tmp_path):
    model = save_tiny("llama", tmp_path / "llama")
    single, sharded, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    _run([model, str(single), "4"], 1)
    _run([model, str(sharded), "4"], 2)
    _run([model, str(resumed), "4", str(sharded / "checkpoint-2")], 2)
    one, two, again = (json.loads((p / "result.json").read_text()) for p in (single, sharded, resumed))
    assert two["world"] == 2 and one["world"] == 1
    _assert_same_training(two, one, AutoModelForCausalLM.from_pretrained(model).state_dict())
    assert again["losses"] == two["losses"][2:]  # resumed from step 2: the same steps 3 and 4, exactly
    for key in one["state"]:
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


def test_fsdp2_palettized_save_of_layers_with_biases(tmp_path):
    """The palettized copies of gathered layers keep their own biases (before: they held FSDP2's gathered tensors,
    freed when the units sharded again, and the save failed reading storage of size 0)."""
    cls, make_config = TINY["llama"]
    config = make_config()
    config.attention_bias = config.mlp_bias = True
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "llama")
    _run([str(tmp_path / "llama"), str(tmp_path / "fsdp"), "1"], 2)
    trained = json.loads((tmp_path / "fsdp" / "result.json").read_text())["state"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    assert len(dkm_hf.palettized_modules(reloaded)) == 2 * 7 + 2  # every Linear, the embedding and the head
    biases = [k for k in trained if k.endswith("bias")]
    assert len(biases) == 2 * 7
    for key in biases:
        assert torch.equal(reloaded.state_dict()[key], torch.tensor(trained[key])), key


def test_trainer_with_accelerate_fsdp2_plugin_matches_one_process_and_saves_once(tmp_path):
    """DKMTrainer with `fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [...]}`: accelerate
    shards the model itself (its fsdp2_prepare_model: a unit per decoder layer, embeddings + norm + lm_head in one, the
    root), the DKM schedule (centroids initialised at the milestone, cluster health and re-seeding at every logging
    step) runs on the gathered layers, and two processes end at the weights and centroids of one process with the
    same global batch. `trainer.save_model` writes one palettized checkpoint that reloads to the in-memory palettized
    model exactly.

    On CPU accelerate ignores the FSDP plugin (AcceleratorState admits it for accelerator backends only, not
    MULTI_CPU) and runs DDP: the script opens that gate; the last run shows the fallback without it."""
    script = os.path.join(TESTS, "accelerate_fsdp_train.py")
    model = save_tiny("llama", tmp_path / "llama")
    single, sharded, gated = tmp_path / "single", tmp_path / "fsdp", tmp_path / "gated"
    _run([model, str(single), "4"], 1, script)
    _run([model, str(sharded), "4"], 2, script)
    one, two = (json.loads((p / "result.json").read_text()) for p in (single, sharded))
    assert one["world"] == 1 and not one["units"]
    assert two["world"] == 2 and two["fsdp_enabled"] and two["distributed_type"] == "DistributedType.FSDP"
    assert {"", "model.layers.0", "model.layers.1", "model.embed_tokens", "lm_head"} <= set(two["units"])
    assert sum(k.endswith("centroids") for k in one["state"]) == 15  # 7 linears x 2 layers + the tied embedding
    _assert_same_training(two, one, AutoModelForCausalLM.from_pretrained(model).state_dict())

    assert sorted(p.name for p in sharded.iterdir()) == ["final", "result.json"]
    assert sorted(p.name for p in (sharded / "final").iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "training_args.bin",
    ]
    for run, result in ((single, one), (sharded, two)):
        reloaded = AutoModelForCausalLM.from_pretrained(run / "final")
        assert reloaded.lm_head.tied_source is reloaded.model.embed_tokens
        assert len(dkm_hf.palettized_modules(reloaded)) == 16 and not dkm_hf.dkm_modules(reloaded)
        logits = reloaded(input_ids=torch.arange(1, 21).view(2, 10)).logits
        assert torch.equal(logits, torch.tensor(result["logits"])), run.name

    _run([model, str(gated), "1", "--keep-cpu-gate"], 2, script)
    fallback = json.loads((gated / "result.json").read_text())
    assert fallback["distributed_type"] == "DistributedType.MULTI_CPU" and not fallback["fsdp_enabled"]
    assert not fallback["units"]


def test_fsdp2_sharded_state_dict_checkpoints_best_step_zero_and_palettized_save(tmp_path):
    """accelerate's FSDP2 plugin with SHARDED_STATE_DICT: checkpoint-0 holds the model Trainer loads as the best one
    (before: the run failed at its end, checkpoint-0 lacking FSDP's model file), a checkpoint without config.json
    resumes (refused as incomplete before), and save_model writes the palettized checkpoint (nothing before)."""
    script = os.path.join(TESTS, "fsdp_checkpoints_train.py")
    model, out = save_tiny("llama", tmp_path / "llama"), tmp_path / "run"
    _run([model, str(out), "train"], 2, script)
    _run([model, str(out), "resume"], 2, script)
    trained, resumed = (json.loads((out / f"{stage}.json").read_text()) for stage in ("train", "resume"))
    assert trained["best"] == str(out / "checkpoint-0") and trained["step"] == resumed["step"] == 2
    assert "pytorch_model_fsdp_0" in trained["checkpoint_0"] and "optimizer_0" not in trained["checkpoint_0"]
    assert not (out / "checkpoint-1" / "config.json").exists()
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert len(dkm_hf.palettized_modules(final)) == 16 and not dkm_hf.dkm_modules(final)  # the tied head too
