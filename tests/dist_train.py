"""Run by test_trainer under `torch.distributed.run --nproc_per_node 2`: DKM training on gloo, CPU."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from toy import ToyDataset
from transformers import AutoModelForSequenceClassification, TrainerCallback

import dkm_hf

model_path, out, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
distill = sys.argv[4:] == ["distill"]  # from the dense model, its KL and hidden-state terms logged
rank = int(os.environ.get("RANK", 0))


def digest(model) -> str:
    h = hashlib.sha256()
    for name, module in dkm_hf.dkm_modules(model):
        h.update(module.centroids.numpy().tobytes())
        h.update(module.weight.detach().numpy().tobytes())
    return h.hexdigest()


class Record(TrainerCallback):
    def __init__(self):
        self.per_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.per_step.append(digest(model))


model = AutoModelForSequenceClassification.from_pretrained(
    model_path, dkm_config=dkm_hf.DKMConfig(bits=3, tau=0.05, weight_threshold=1000)
)
args = dkm_hf.DKMTrainingArguments(
    output_dir=out,
    per_device_train_batch_size=batch_size,
    learning_rate=0.1,
    max_steps=4,
    logging_steps=2,
    optim="sgd",
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    **({"distill_hidden_weight": 0.5} if distill else {}),
)
record = Record()
teacher = {"teacher_model": AutoModelForSequenceClassification.from_pretrained(model_path)} if distill else {}
trainer = dkm_hf.DKMTrainer(model=model, args=args, train_dataset=ToyDataset(128), callbacks=[record], **teacher)
trainer.train()
trainer.save_model(os.path.join(out, "final"))
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
weights = {name: module.weight.detach().tolist() for name, module in dkm_hf.dkm_modules(model)}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    json.dump({"per_step": record.per_step, "world": world, "weights": weights, "logs": logs}, f)
if torch.distributed.is_initialized():  # leave together (see accelerate_fsdp_train.py)
    torch.distributed.barrier()
trainer.accelerator.end_training()  # destroys the process group: a rank leaving with gloo alive can abort at exit
