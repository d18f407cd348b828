"""The causal-LM example with the widths per layer that `dkm_hf.allocate_bits` chooses with a given number of k-means
runs per LUT (the example passes 1), for the measurements in benchmarks/RESULTS.md ("A width per layer").

    python benchmarks/clm_mixed_bits.py --bits 3 --choices 2 3 4 --restarts 4 [--seed 42] [--dry_run] -- [example args]

The importance is the example's (`gradient_importance` over its seeded draw of 16 training batches of 4 x 128); the
chosen widths go to the example as per-layer overrides (with `--bit_choices none`, so that it chooses none itself)
and it runs that width's recipe otherwise. `--dry_run` prints the widths per kind of layer and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import dkm_hf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from causal_lm.convert_gguf import smollm2  # noqa: E402
from causal_lm.run_clm_dkm import EMBEDDINGS_8BIT, bbc_news, to_blocks  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def widths(model_path: str, bits: int, choices: list[int], seed: int, restarts: int) -> dict[str, dict]:
    """The overrides `allocate_bits` adds for the example's per-row recipe at `bits`."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = to_blocks(tokenizer, bbc_news(seed)[0], 128)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    batches = [train[order[i : i + 4]] for i in range(0, 16 * 4, 4)]  # the example's draw
    config = dkm_hf.DKMConfig(
        bits=bits, granularity="per_grouped_channel", group_size=1, overrides=EMBEDDINGS_8BIT, kmeans_restarts=4
    )
    model = dkm_hf.prepare(AutoModelForCausalLM.from_pretrained(model_path), config, init=False)
    importance = dkm_hf.gradient_importance(model, [{"input_ids": b, "labels": b} for b in batches])
    t0 = time.time()
    mixed = dkm_hf.allocate_bits(model, importance, choices, restarts=restarts)
    print(f"allocate_bits: {time.time() - t0:.0f} s", flush=True)
    return {p: o for p, o in mixed.overrides.items() if p not in config.overrides}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--choices", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dry_run", action="store_true", help="print the widths, run nothing")
    parser.add_argument("example", nargs=argparse.REMAINDER, help="-- then the example's arguments")
    args = parser.parse_args()
    chosen = widths(smollm2(), args.bits, args.choices, args.seed, args.restarts)
    counts = {b: sum(1 for o in chosen.values() if o["bits"] == b) for b in args.choices if b != args.bits}
    print(f"{len(chosen)} layers not at {args.bits} bits: {counts}")
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        row = [
            chosen.get(f"model.layers.{i}.{'self_attn' if kind[1:] == '_proj' else 'mlp'}.{kind}") for i in range(30)
        ]
        print(f"  {kind}: " + " ".join(str(o["bits"]) if o else str(args.bits) for o in row))
    if args.dry_run:
        return
    command = [
        sys.executable, str(ROOT / "examples" / "causal_lm" / "run_clm_dkm.py"), "--bits", str(args.bits),
        "--seed", str(args.seed), "--bit_choices", "none", "--overrides", json.dumps(EMBEDDINGS_8BIT | chosen),
        *[a for a in args.example if a != "--"],
    ]  # fmt: skip
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
