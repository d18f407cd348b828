"""Run by test_distributed under `torch.distributed.run --nproc_per_node 2` (FSDP2 on gloo, CPU), or as one process:
DKM training of a tiny Llama with tied embeddings, `fully_shard` on every decoder layer and then the model.

    python tests/fsdp_train.py MODEL OUT STEPS [RESUME_FROM]

Writes OUT/result.json (rank 0): the full weights and centroids after STEPS steps and every step's loss. At step 2
it writes a distributed checkpoint (model + optimizer) to OUT/checkpoint-2; with RESUME_FROM it starts from one. At
the end every rank palettizes (after gathering the full weights) and rank 0 saves OUT/final.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

import dkm_hf

model_path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.manual_seed(0)

model = AutoModelForCausalLM.from_pretrained(
    model_path, dkm_config=dkm_hf.DKMConfig(bits=3, tau=0.05, weight_threshold=0, max_iters=2)
)
if distributed:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
start = 0
if resume is not None:
    state = {"model": {}, "optim": {}}
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=resume)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    start = int(resume.rstrip("/").rsplit("-", 1)[1])

data = torch.randint(1, 99, (steps, 8, 10), generator=torch.Generator().manual_seed(1))  # global batch 8 per step
per_rank = data.shape[1] // world
losses = []
model.train()
for step in range(start, steps):
    x = data[step, rank * per_rank : (rank + 1) * per_rank]
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.detach().clone())
    if step + 1 == 2 and resume is None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(out, "checkpoint-2"))
if distributed:  # the mean loss over the global batch, as one process computes it
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    losses = (losses / world).tolist()
else:
    losses = [float(v) for v in losses]

full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
with dkm_hf.full_weights(model):  # FSDP2: every rank palettizes the gathered weights
    dkm_hf.palettize(model)
model.save_pretrained(os.path.join(out, "final"), is_main_process=rank == 0)  # rank 0 writes
if rank == 0:
    kept = {
        k: v.tolist()
        for k, v in full.items()
        if k.endswith(("centroids", "mlp.up_proj.weight", "embed_tokens.weight", "bias"))
    }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"losses": losses, "state": kept, "world": world}, f)
if distributed:
    # Both ranks leave together, and without tearing gloo down: its threads' destructors can abort a rank at exit
    # ("terminate called without an active exception"), also after destroy_process_group on a loaded machine.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
