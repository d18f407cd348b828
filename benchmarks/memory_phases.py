"""Peak host memory of dkm_hf's phases, an older revision against this checkout, side by side.

    python benchmarks/memory_phases.py --old-ref 0ad987b [--repeats 2] [--phases prepare-llm hard-moe ...]

Each measurement is a fresh process at one thread: it builds a random model in bfloat16, runs the steps before the
phase, and reports the phase's peak resident memory above the process's memory just before it (glibc's
`malloc_trim` first hands back what the earlier steps freed, which the phase would otherwise reuse unseen; the peak is
reset through /proc/self/clear_refs: Linux and glibc only), the old revision's package first on PYTHONPATH or this
checkout's.
Revisions alternate; the medians and their ratio are printed. Models: a Llama of SmolLM2-135M's shape with the
causal-LM example's LUTs ("llm": per-row 4-bit, the tied embedding at 8 bits per tensor), and one Qwen3-MoE layer
whose 64 stacked experts hold 50M weights in one tensor ("moe", the default DKMConfig: one 4-bit LUT per expert).

Phases: prepare (to DKM modules and the k-means), hard (an evaluation forward: the hard weights, cached), palettize,
step (one training step of 1 x 32 tokens with AdamW, after one step to create the optimizer state), inspect (`dkm-hf
inspect` of the saved palettized checkpoint, in-process), coreml (Core ML's weight layout of the loaded checkpoint,
without coremltools' conversion).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("prepare", "hard", "palettize", "step", "inspect", "coreml")
DEFAULT = ("prepare-llm", "hard-llm", "palettize-llm", "inspect-llm", "coreml-llm", "prepare-moe", "step-moe")


def _rss_mb() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return fields["VmRSS"] / 1024, fields["VmHWM"] / 1024


def _model(kind: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if kind == "llm":
        config = LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config).to(torch.bfloat16)
    config = Qwen3MoeConfig(
        hidden_size=768, moe_intermediate_size=512, intermediate_size=2048, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=4,
        vocab_size=8192, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config).to(torch.bfloat16)


def _config(kind: str):
    import dkm_hf

    if kind == "moe":
        return dkm_hf.DKMConfig(bits=4)
    embedding = {".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}}
    return dkm_hf.DKMConfig(bits=4, granularity="per_grouped_channel", group_size=1, overrides=embedding)


def child(phase: str, kind: str, workdir: str) -> dict:
    """Run the steps before `phase` on a fresh model, then `phase` with the peak measured."""
    import torch

    torch.set_num_threads(1)
    import dkm_hf

    model = _model(kind)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    checkpoint = Path(workdir) / f"palettized-{kind}"

    def measured(run) -> float:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what earlier steps freed goes back to the system: not reused here
        before, _ = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        run()
        return _rss_mb()[1] - before

    if phase == "prepare":
        return {"peak_mb": measured(lambda: dkm_hf.prepare(model, _config(kind)))}
    dkm_hf.prepare(model, _config(kind))
    if phase == "hard":
        model.eval()
        return {"peak_mb": measured(lambda: torch.no_grad()(model)(ids))}
    if phase == "step":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        return {"peak_mb": measured(step)}
    if phase == "palettize":
        return {"peak_mb": measured(lambda: dkm_hf.palettize(model))}
    dkm_hf.palettize(model).save_pretrained(checkpoint)
    model = None  # freed before the phase
    if phase == "inspect":
        from dkm_hf.cli import main

        return {"peak_mb": measured(lambda: main(["inspect", str(checkpoint)]))}
    if phase == "coreml":
        from transformers import AutoModelForCausalLM

        from dkm_hf.integrations.coreml import coreml_weights

        loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
        return {"peak_mb": measured(lambda: coreml_weights(loaded))}
    raise ValueError(f"unknown phase {phase!r}")


def measure(package_root: Path | None, spec: str, workdir: str) -> float:
    phase, kind = spec.split("-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--child", phase, kind, workdir]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, cwd=workdir)
    if done.returncode:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-ref", default="0ad987b", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=list(DEFAULT), help=f"PHASE-MODEL, PHASE in {PHASES}")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    sys.path.insert(0, str(HERE))
    from common import package_at

    with tempfile.TemporaryDirectory() as old_dir, tempfile.TemporaryDirectory() as work:
        package_at(args.old_ref, Path(old_dir))
        rows = []
        for spec in args.phases:
            runs = {"old": [], "new": []}
            for _ in range(args.repeats):
                runs["old"].append(measure(Path(old_dir), spec, work))
                runs["new"].append(measure(None, spec, work))
            old, new = statistics.median(runs["old"]), statistics.median(runs["new"])
            rows.append((spec, old, new))
            print(f"{spec}: old {runs['old']} new {runs['new']}", file=sys.stderr, flush=True)
    print(f"| phase-model | {args.old_ref} peak above the process (MB) | this checkout (MB) | ratio |")
    print("|---|---:|---:|---:|")
    for spec, old, new in rows:
        print(f"| {spec} | {old:,.0f} | {new:,.0f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
