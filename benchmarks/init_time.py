"""Centroid initialisation time of a whole model, an older revision of dkm_hf against this checkout, side by side.

    python benchmarks/init_time.py                      # SmolLM2-135M's shape, random weights, vs 77e932b
    python benchmarks/init_time.py --old-ref v0.3 --repeats 3 --threads 2 --model outputs/smollm2-135m

Each measurement is a fresh process: it builds the model (a random Llama of SmolLM2-135M's shape from
scripts/random_llama.py, float32 weights rounded to bfloat16 like the released checkpoint's, or --model's weights),
swaps in the DKM modules with the causal-LM example's recipe (per-row 4-bit LUTs, the tied embedding at 8 bits per
tensor, --restarts k-means runs per LUT) and times `surgery.convert.init_centroids`. The old revision runs from
`git archive` of its dkm_hf. Prints the median seconds of each and the total k-means inertia of both (the sum of
squared distances of every clustered vector to its nearest centroid), so speed and quality read side by side.
"""

from __future__ import annotations

import argparse
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
    from dkm_hf.ops.attention import gather_centroids, hard_assign
    from dkm_hf.surgery.convert import init_centroids, to_dkm

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**(SMOLLM2_135M | {"num_hidden_layers": args.layers})))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    config = dkm_hf.DKMConfig(
        bits=args.bits,
        granularity="per_grouped_channel",
        group_size=1,
        kmeans_restarts=args.restarts,
        overrides={".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
    )
    modules = [m for m in to_dkm(model, config).values() if m.tied_source is None]
    try:  # the CPU extension is built (or loaded) before the clock starts, in revisions that have one
        from dkm_hf.ops import fused

        fused.cpu_kernels()
    except ImportError:
        pass
    start = time.perf_counter()
    init_centroids(model)
    seconds = time.perf_counter() - start
    inertia = 0.0
    with torch.no_grad():
        for m in modules:
            v, c = m.vectors(), m.centroids
            if v.shape[-1] == 1:  # nearest of sorted centroids by their midpoints: no (n, k) distance matrix
                c = c.squeeze(-1).sort(1).values
                index = torch.searchsorted((c[:, 1:] + c[:, :-1]) / 2, v.squeeze(-1).contiguous())
                nearest = c.gather(1, index).unsqueeze(-1)
            else:
                nearest = gather_centroids(hard_assign(v, c), c)
            inertia += float((v - nearest).double().square().sum())
    print(json.dumps({"seconds": seconds, "inertia": inertia, "modules": len(modules)}))


def measure(package_dir: Path, args: argparse.Namespace, label: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(package_dir), OMP_NUM_THREADS=str(args.threads))
    # each revision builds its C++ extension into its own folder (one shared folder would rebuild at every switch)
    env["XDG_CACHE_HOME"] = str(Path(tempfile.gettempdir()) / "dkm_hf_init_time" / label)
    command = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--bits", str(args.bits)]
    command += ["--restarts", str(args.restarts), "--layers", str(args.layers)]
    command += ["--model", args.model] if args.model else []
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the measurement in {package_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--old-ref", default="77e932b", help="git revision of the old path (77e932b: the last per-layer one)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the random model (SmolLM2: 30)")
    parser.add_argument("--model", default=None, help="a saved causal LM instead of the random one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as old_dir:
        package_at(args.old_ref, Path(old_dir))
        runs = {"old": [], "new": []}
        for _ in range(args.repeats):  # interleaved: a change in the machine's load hits both
            runs["old"].append(measure(Path(old_dir), args, f"old-{args.old_ref}"))
            runs["new"].append(measure(ROOT, args, "checkout"))
    model = args.model or f"random Llama, SmolLM2-135M shape, {args.layers} layers"
    print(f"{model}; {args.bits}-bit per-row LUTs, {args.restarts} restarts, {args.threads} threads")
    print(f"{'path':<28}{'median s':>10}{'runs (s)':>28}{'inertia':>14}")
    for name, label in (("old", f"old ({args.old_ref})"), ("new", "new (this checkout)")):
        seconds = [r["seconds"] for r in runs[name]]
        shown = " ".join(f"{s:.1f}" for s in seconds)
        print(f"{label:<28}{statistics.median(seconds):>10.1f}{shown:>28}{runs[name][0]['inertia']:>14.6g}")


if __name__ == "__main__":
    main()
