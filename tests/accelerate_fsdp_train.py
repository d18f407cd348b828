"""Run by test_distributed under `torch.distributed.run --nproc_per_node 2` (accelerate's FSDP2 plugin, gloo, CPU), or
as one process (no FSDP, the same global batch): DKMTrainer on a tiny Llama with tied embeddings, FSDP configured as a
user does, through TrainingArguments (`fsdp=True`, `fsdp_config={"version": 2, ...}`).

    python tests/accelerate_fsdp_train.py MODEL OUT STEPS [--keep-cpu-gate]

accelerate only builds its FSDP plugin for accelerator backends: `AcceleratorState.__init__` (accelerate/state.py)
sets `DistributedType.FSDP` inside a branch taken for MULTI_GPU/NPU/XPU/HPU/... but not MULTI_CPU, so with
`use_cpu=True` the plugin is dropped without a word and the Trainer runs DDP. Here the shared PartialState reads
MULTI_GPU when the Trainer builds its Accelerator (nothing else changes: the device stays the CPU, the backend gloo),
so that accelerate's own FSDP2 preparation (`fsdp2_prepare_model`), the Trainer's FSDP branches and
`Accelerator.get_state_dict` run as they do on GPUs. `--keep-cpu-gate` leaves accelerate as it is (to show the
fallback).

Writes OUT/result.json (rank 0): the full weights and centroids after STEPS steps, the losses, how the model was
wrapped, and the logits of the in-memory palettized model on fixed inputs; `trainer.save_model(OUT/final)` writes the
palettized checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, TrainerCallback

import dkm_hf
from dkm_hf.integrations.distributed import full_state_dict
from dkm_hf.nn.weights import is_sharded

model_path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
keep_gate = "--keep-cpu-gate" in sys.argv
world = int(os.environ.get("WORLD_SIZE", 1))
torch.manual_seed(0)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.ids = torch.randint(1, 99, (n, 10), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(logs["loss"])


def open_accelerate_fsdp_gate() -> None:
    """accelerate's FSDP gate admits accelerators only (see the module docstring). AcceleratorState shares its fields
    with PartialState and turns MULTI_GPU into FSDP when given the plugin, so it must not be set back afterwards."""
    state = PartialState()  # built by TrainingArguments
    if not keep_gate and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


model = AutoModelForCausalLM.from_pretrained(
    model_path, dkm_config=dkm_hf.DKMConfig(bits=3, tau=0.05, weight_threshold=0, max_iters=2, milestone=1)
)
fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
args = dkm_hf.DKMTrainingArguments(
    output_dir=out,
    per_device_train_batch_size=8 // world,  # global batch 8
    learning_rate=1e-2,
    max_steps=steps,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    **(fsdp if world > 1 else {}),
)
losses = Losses()
open_accelerate_fsdp_gate()
trainer = dkm_hf.DKMTrainer(model=model, args=args, train_dataset=Data(8 * steps), callbacks=[losses])
trainer.train()
model = trainer.model  # under FSDP the Trainer's model is the sharded one
wrapped = {
    "distributed_type": str(trainer.accelerator.distributed_type),
    "fsdp_enabled": trainer.is_fsdp_enabled,
    "units": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
}
full = full_state_dict(model) if is_sharded(model) else model.state_dict()
trainer.save_model(os.path.join(out, "final"))

with dkm_hf.full_weights(model):  # every rank palettizes the gathered weights
    dkm_hf.palettize(model)
model.eval()
with torch.no_grad():  # a collective forward under FSDP: every rank runs it
    logits = model(input_ids=torch.arange(1, 21).view(2, 10)).logits
if trainer.args.process_index == 0:
    kept = {k: v.tolist() for k, v in full.items() if k.endswith(("centroids", ".weight"))}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"losses": losses.values, "state": kept, "world": world, "logits": logits.tolist(), **wrapped}, f)
# Leave together: a rank that exits while gloo still holds the group can abort at interpreter exit ("terminate called
# without an active exception"), failing the launch after the work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
trainer.accelerator.end_training()  # destroys the process group
