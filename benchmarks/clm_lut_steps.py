"""Steps that train only the LUTs of a palettized causal LM (the indices frozen), on the example's training text, and
its perplexity on both held-out texts before and after, for benchmarks/RESULTS.md ("The tied embedding among the
widths the allocation chooses"). Measured, not a dkm_hf feature.

    python benchmarks/clm_lut_steps.py CHECKPOINT --seed 43 --steps 10 --learning_rate 3e-4

CHECKPOINT: a palettized checkpoint of examples/causal_lm/run_clm_dkm.py (its `compressed-4bit`), `--seed` the
example's (it draws the BBC News split). Each palettized weight becomes a dense parameter computed from its LUT (a
trainable (groups, 2**bits) tensor) and its indices, so AdamW trains the LUT entries only; a tied head keeps the
embedding's values as decoded (its LUT is the embedding's: the probe leaves it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM, AutoTokenizer

import dkm_hf
from dkm_hf.nn.palettized import palettized_modules
from dkm_hf.ops.packing import unpack_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from causal_lm.run_clm_dkm import bbc_news, perplexity, to_blocks, tweets  # noqa: E402


class FromLut(nn.Module):
    """The weight as its LUT's entries at frozen indices: (groups, k) LUT, (groups, n) or (n,) indices."""

    def __init__(self, lut: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.lut = nn.Parameter(lut.float().squeeze(-1))
        self.register_buffer("indices", indices, persistent=False)
        self.shape = shape

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        if self.lut.shape[0] == 1:
            return self.lut[0][self.indices].view(self.shape)
        return torch.gather(self.lut, 1, self.indices).view(self.shape)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    train_texts, held_texts = bbc_news(args.seed)
    train, held = to_blocks(tokenizer, train_texts, 128), to_blocks(tokenizer, held_texts, 128)[:64]
    other = to_blocks(tokenizer, tweets(), 128)[:64]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    luts = {}
    for name, weight in palettized_modules(model):
        if weight.tied_source is None:
            lay = weight.layout
            indices = unpack_bytes(weight.weight_indices, lay.bits)[: lay.vectors].long()
            luts[name] = FromLut(weight.weight_lut, indices.view(lay.groups, -1) if lay.groups > 1 else indices,
                                 tuple(lay.shape))  # fmt: skip
    model = dkm_hf.dequantize(model)
    modules = dict(model.named_modules())
    for name, lut in luts.items():
        parametrize.register_parametrization(modules[name], "weight", lut, unsafe=True)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".lut"))
    before = perplexity(model, held), perplexity(model, other)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    model.train()
    for step in range(args.steps):
        x = train[order[step * args.batch_size : (step + 1) * args.batch_size]]
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    after = perplexity(model, held), perplexity(model, other)
    print(json.dumps({**vars(args), "before": before, "after": after}))


if __name__ == "__main__":
    main()
