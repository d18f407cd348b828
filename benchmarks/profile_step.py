"""Where the time of one DKM fine-tuning step goes: torch.profiler's top operators, plus plain vs DKM step times.

    python benchmarks/profile_step.py MODEL_DIR [--device cuda] [--batch 8 --seq 256] [--dtype bfloat16]
                                     [--implementation auto|fused|chunked|uniquified] [--skip-embeddings]

MODEL_DIR is a causal LM folder (e.g. scripts/random_llama.py's output, or the SmolLM2 cache folder of the model
suite). The DKM settings are the model suite's LLM recipe (per-row 4-bit LUTs, embedding 8-bit per tensor, one
iteration; `--implementation` sets DKMConfig.implementation). Both models run in this process, plain first; the
step times are medians of --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from suite_model import LLM_RECIPE
from transformers import AutoModelForCausalLM

import dkm_hf


def steps(model, ids, n, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for _ in range(n + 1):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--implementation", default="auto", help="DKMConfig.implementation")
    parser.add_argument("--skip-embeddings", action="store_true", help="cluster_embeddings=False (e.g. with chunked)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    load = {"dtype": dtype, "device_map": args.device}
    plain = AutoModelForCausalLM.from_pretrained(args.model_dir, **load)
    ids = torch.randint(5, plain.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    plain.train()
    t_plain, opt = steps(plain, ids, args.steps, device)
    peak_plain = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    del plain, opt
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    recipe = LLM_RECIPE | {"implementation": args.implementation}
    if args.skip_embeddings:
        recipe |= {"cluster_embeddings": False, "overrides": {}}  # the recipe's overrides are the embedding's
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dkm_config=dkm_hf.DKMConfig(**recipe), **load)
    model.train()
    t_dkm, opt = steps(model, ids, args.steps, device)
    peak_dkm = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(
        f"{args.batch} x {args.seq}, {args.dtype} on {device}: plain step {t_plain * 1e3:.1f} ms, DKM step "
        f"{t_dkm * 1e3:.1f} ms, ratio {t_dkm / t_plain:.2f}"
        + (
            f"; peak memory plain {peak_plain:.0f} MB, DKM {peak_dkm:.0f} MB ({peak_dkm / peak_plain:.2f}x)"
            if cuda
            else ""
        )
    )
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=70))
    if cuda:  # a step bound by launches: where the host's time goes too
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=70))
        launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"device kernels in one DKM step: {launches}")


if __name__ == "__main__":
    main()
