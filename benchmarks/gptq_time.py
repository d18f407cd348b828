"""GPTQ's snapping time on a whole model, an older revision of dkm_hf against this checkout, side by side.

    python benchmarks/gptq_time.py                      # SmolLM2-135M's shape, random weights, vs 248630d
    python benchmarks/gptq_time.py --old-ref REV --repeats 3 --threads 1 --batches 16 --model outputs/smollm2-135m

Each measurement is a fresh process: it builds the model (a random Llama of SmolLM2-135M's shape from
scripts/random_llama.py, or --model's weights), prepares it with the causal-LM example's recipe (per-row LUTs, the
tied embedding at 8 bits per tensor; the k-means runs before the clock starts) and times `dkm_hf.gptq_snap` on
--batches batches of 4 x 128 random tokens (seeded): the first width's call, and, where the revision takes
`hessians=`, a second model's (another width) with the Gram matrices the first call left. 248630d computes one X^T X
per layer and batch and has no `hessians`: its second width costs what its first does. Prints the medians of both
revisions, their ratios, and the share of snapping choices on which the two revisions' first calls differ (float
reordering of the Gram matrices only).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import package_at

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    from random_llama import SMOLLM2_135M
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import dkm_hf

    def build(bits: int):
        if args.model:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        else:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_135M | {"num_hidden_layers": args.layers})))
        config = dkm_hf.DKMConfig(
            bits=bits,
            granularity="per_grouped_channel",
            group_size=1,
            overrides={".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
        )
        return dkm_hf.prepare(model, config)

    generator = torch.Generator().manual_seed(0)
    vocab = 49152 if not args.model else None
    model = build(4)
    vocab = vocab or model.config.vocab_size
    batches = [{"input_ids": torch.randint(vocab, (4, 128), generator=generator)} for _ in range(args.batches)]
    cached = "hessians" in inspect.signature(dkm_hf.gptq_snap).parameters
    hessians: dict = {}
    start = time.perf_counter()
    if cached:
        dkm_hf.gptq_snap(model, batches, hessians=hessians)
    else:
        dkm_hf.gptq_snap(model, batches)
    first = time.perf_counter() - start
    choices = {}
    for name, state in dkm_hf.dkm_modules(model):
        if name.endswith("proj"):
            w, c = state.weight.detach().float(), state.centroids[..., 0].float()
            choices[name] = (state.layout.to_rows(w)[..., None] - c[:, None, :]).abs().argmin(-1).to(torch.uint8)
    torch.save(choices, args.choices)
    second = None
    if cached:
        del model
        model = build(3)
        start = time.perf_counter()
        dkm_hf.gptq_snap(model, batches, hessians=hessians)
        second = time.perf_counter() - start
    print(json.dumps({"first": first, "second": second}))


def measure(package_dir: Path, args: argparse.Namespace, label: str, choices: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(package_dir), OMP_NUM_THREADS=str(args.threads))
    env["XDG_CACHE_HOME"] = str(Path(tempfile.gettempdir()) / "dkm_hf_gptq_time" / label)
    command = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--layers", str(args.layers)]
    command += ["--batches", str(args.batches), "--choices", choices] + (["--model", args.model] if args.model else [])
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the measurement in {package_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="248630d", help="git revision of the old path (248630d: no sharing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the random model (SmolLM2: 30)")
    parser.add_argument("--model", default=None, help="a saved causal LM instead of the random one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--choices", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    with tempfile.TemporaryDirectory() as old_dir:
        package_at(args.old_ref, Path(old_dir))
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        files = {"old": str(Path(old_dir) / "old.pt"), "new": str(Path(old_dir) / "new.pt")}
        for _ in range(args.repeats):  # interleaved: a change in the machine's load hits both
            runs["old"].append(measure(Path(old_dir), args, f"old-{args.old_ref}", files["old"]))
            runs["new"].append(measure(ROOT, args, "checkout", files["new"]))
        old, new = torch.load(files["old"]), torch.load(files["new"])
        differ = sum(int((old[n] != new[n]).sum()) for n in old) / sum(t.numel() for t in old.values())
    model = args.model or f"random Llama, SmolLM2-135M shape, {args.layers} layers"
    old_first = statistics.median(r["first"] for r in runs["old"])
    new_first = statistics.median(r["first"] for r in runs["new"])
    new_second = statistics.median(r["second"] for r in runs["new"])
    # a revision without `hessians=` runs its second width like its first
    old_second = statistics.median(r["second"] if r["second"] is not None else r["first"] for r in runs["old"])
    print(f"gptq_snap on {model}, {args.batches} batches of 4 x 128, {args.threads} thread(s), {args.repeats} runs")
    print("| call | old " + args.old_ref + " (s) | this checkout (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| first width | {old_first:.1f} | {new_first:.1f} | {new_first / old_first:.2f} |")
    print(f"| second width | {old_second:.1f} | {new_second:.1f} | {new_second / old_second:.2f} |")
    print(f"| both widths | {old_first + old_second:.1f} | {new_first + new_second:.1f} | "
          f"{(new_first + new_second) / (old_first + old_second):.2f} |")  # fmt: skip
    print(f"snapping choices that differ between the revisions' first calls: {differ:.2e}")


if __name__ == "__main__":
    main()
