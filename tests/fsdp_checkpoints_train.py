"""Run by test_distributed under `torch.distributed.run --nproc_per_node 2`: DKMTrainer through accelerate's FSDP2
plugin with `state_dict_type: SHARDED_STATE_DICT` (checkpoints as torch.distributed.checkpoint folders, no
config.json), evaluated at every step with `load_best_model_at_end` while step 0's hard model stays the best.

    python tests/fsdp_checkpoints_train.py MODEL OUT train|resume

train: 2 steps, a checkpoint each, then `trainer.save_model(OUT/final)`; resume: from OUT/checkpoint-1 to step 2.
Writes OUT/<stage>.json (rank 0): the best checkpoint, checkpoint-0's files and the last step.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM

import dkm_hf

model_path, out, stage = sys.argv[1], sys.argv[2], sys.argv[3]


class Data(torch.utils.data.Dataset):
    ids = torch.randint(1, 99, (16, 10), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_path, dkm_config=dkm_hf.DKMConfig(bits=3, weight_threshold=0))
args = dkm_hf.DKMTrainingArguments(
    output_dir=out,
    per_device_train_batch_size=4,
    max_steps=2,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    save_strategy="steps",
    save_steps=1,
    eval_strategy="steps",
    eval_steps=1,
    load_best_model_at_end=True,
    initial_model_margin=1e9,  # step 0's model stays the best
    fsdp=True,
    fsdp_config={
        "version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",
    },
)
state = PartialState()  # accelerate admits its FSDP plugin on accelerators only: see accelerate_fsdp_train.py
if state.distributed_type == DistributedType.MULTI_CPU:
    state.distributed_type = DistributedType.MULTI_GPU
trainer = dkm_hf.DKMTrainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data())
if stage == "train":
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
else:
    trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-1"))
if args.process_index == 0:
    result = {
        "best": trainer.state.best_model_checkpoint,
        "checkpoint_0": sorted(os.listdir(os.path.join(out, "checkpoint-0"))),
        "step": trainer.state.global_step,
    }
    with open(os.path.join(out, f"{stage}.json"), "w") as f:
        json.dump(result, f)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
trainer.accelerator.end_training()
