"""Accuracy suite: all-MiniLM-L6-v2 on tweet sentiment, dense vs post-training k-means vs DKM (with and without
distillation) vs coremltools, every compressed row starting from one well-trained dense model.

The full recipe trains the dense model on all 34,243 deduplicated training texts (one epoch, which converges:
validation accuracy is flat over its last third), then compresses it at 4, 3 and 2 bits. One fresh process
(`child_accuracy`) per row; every training row goes through transformers' Trainer (DKMTrainer for DKM), picks its
best hard model on 1,000 validation texts (step 0 included: for DKM that is post-training k-means) and is scored on
2,000 test texts after a reload from its saved (palettized) checkpoint. `report_accuracy` writes the RESULTS.md table.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import CACHE, have_coremltools, minilm_path, outcome, run_suite_child, tweet_sentiment
from measure import emit, markdown_table, progress

# Child time limits, shared with `--retry-failed`. coremltools' 4-bit row took 4,881 s of training alone for 63
# steps at one thread here, 1,880 s of it its first step (centroid initialisation of 22.7M weights).
ACCURACY_TIMEOUT_S = 3600
COREMLTOOLS_ACCURACY_TIMEOUT_S = 9000
ACCURACY_COREMLTOOLS_NOTE = (
    "coremltools is not installed (pip install coremltools==9.0): its accuracy rows are skipped."
)
COREMLTOOLS_FULL_NOTE = (
    "coremltools DKM is not run on the full recipe: at its measured ~51 s per step on this machine (plus ~30 minutes "
    "of centroid initialisation) the DKM phase would take over 4 hours per row; the quick recipe has its rows."
)

DENSE_RESULT = "dkm_hf_dense_result.json"  # written next to the dense checkpoint: its spec and measured result

# The recipes. `dense`: the dense fine-tune from the pretrained checkpoint; `phase`: what every compression row
# (and the no-clustering control) runs from the dense model: the DKM defaults of README "Recipes".
FULL = {
    "train_size": None,  # all of them
    "max_len": 64,
    "dense": {"epochs": 1, "lr": 5e-5, "batch": 32, "warmup": 0.06},
    # "eval_steps": "end": the hard model is evaluated (and checkpointed) at step 0 and at the last step only, and the
    # end replaces step 0 only when better by the margin (README, Training: "compare the end with the start"). With
    # the annealed tau of 3 and 2 bits the hard model dips mid-phase and recovers as tau anneals; picking among
    # mid-phase checkpoints by validation accuracy chose worse models (results/accuracy_3bit_600_steps.json).
    "phase": {"steps": 200, "lr": 2e-5, "batch": 16, "eval_steps": "end"},
    # fewer bits, more to recover: 3 bits trains six times as long, 2 bits four times (RESULTS_NOTES: "MiniLM at 3
    # bits", "2 bits: an 800-step phase", the suite rerun's "3 bits, 1,200 steps")
    "phase_by_bits": {3: {"steps": 1200}, 2: {"steps": 800}},
}
QUICK = {
    "train_size": 2000,
    "max_len": 64,
    "dense": {"epochs": 3, "lr": 5e-5, "batch": 32, "warmup": 0.06},
    "phase": {"steps": 60, "lr": 2e-5, "batch": 16, "eval_steps": 20},
}


class _Texts:
    """A map-style dataset of tokenised (text, label) rows for Trainer; padding is the collator's."""

    def __init__(self, rows, tokenizer, max_len):
        self.rows, self.tokenizer, self.max_len = rows, tokenizer, max_len

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        text, label = self.rows[i]
        return self.tokenizer(text, truncation=True, max_length=self.max_len) | {"labels": label}


def evaluate(model, tokenizer, rows, max_len) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 128):
            chunk = rows[start : start + 128]
            enc = tokenizer(
                [t for t, _ in chunk], truncation=True, max_length=max_len, padding=True, return_tensors="pt"
            )
            labels = torch.tensor([label for _, label in chunk])
            correct += (model(**enc).logits.argmax(-1) == labels).sum().item()
    return 100.0 * correct / len(rows)


def fit(
    model, tokenizer, train_rows, val_rows, spec: dict, out: str, teacher=None, step_hook=None, test_rows=None
) -> dict:
    """Train with Trainer (DKMTrainer for a DKM model): AdamW, linear decay, the run's best model by validation
    accuracy (evaluated from step 0) restored at the end. Returns the training facts for the report.

    With `test_rows`, every evaluation also scores the model on them (`test_curve`, next to `val_curve`): a
    diagnostic of what validation selects, never used to select."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    import dkm_hf

    run = spec["run"]
    dkm = bool(dkm_hf.dkm_modules(model))
    # "end": evaluate and checkpoint at step 0 and at the last step only
    every = run["steps"] if run.get("eval_steps") == "end" else run.get("eval_steps")
    evaluated = bool(every)
    length = {"max_steps": run["steps"]} if "steps" in run else {"num_train_epochs": run["epochs"]}
    args = {
        "output_dir": out,
        "per_device_train_batch_size": run["batch"],
        "per_device_eval_batch_size": 128,
        "learning_rate": run["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": run.get("warmup", 0),
        "weight_decay": 0.01,
        "logging_steps": 50,
        "eval_strategy": "steps" if evaluated else "no",
        "eval_steps": every,
        "eval_on_start": evaluated,
        "save_strategy": "steps" if evaluated else "no",
        "save_steps": every,
        "save_total_limit": 1,
        "save_only_model": True,
        "load_best_model_at_end": evaluated,
        "metric_for_best_model": "accuracy",
        "report_to": [],
        "use_cpu": True,
        "seed": spec["seed"],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    } | length

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if step_hook is not None:
                step_hook()
            if state.global_step == 1 or state.global_step % 50 == 0:
                progress(f"step {state.global_step}/{state.max_steps} after {time.perf_counter() - start:.0f} s")

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            if test_rows is not None:  # the model as evaluated: the hard one for DKM; training resumes in train()
                test_curve.append(
                    (state.global_step, round(evaluate(model, tokenizer, test_rows, spec["max_len"]), 2))
                )

    test_curve = []

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean() * 100)}

    kwargs = {
        "model": model,
        "train_dataset": _Texts(train_rows, tokenizer, spec["max_len"]),
        "eval_dataset": _Texts(val_rows, tokenizer, spec["max_len"]) if evaluated else None,
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": accuracy,
        "callbacks": [Progress()],
    }
    if dkm:
        margin = {"initial_model_margin": run["initial_model_margin"]} if "initial_model_margin" in run else {}
        distill = run.get("distill", {})  # DKMTrainingArguments' distill_* fields, e.g. {"distill_alpha": 0.9}
        trainer = dkm_hf.DKMTrainer(
            args=dkm_hf.DKMTrainingArguments(**args, **margin, **distill), teacher_model=teacher, **kwargs
        )
    else:
        trainer = Trainer(args=TrainingArguments(**args), **kwargs)
    start = time.perf_counter()
    trainer.train()
    curve = [(h["step"], round(h["eval_accuracy"], 2)) for h in trainer.state.log_history if "eval_accuracy" in h]
    return {
        "train_s": time.perf_counter() - start,
        "val_curve": curve,
        "best_step": trainer.state.best_global_step if evaluated else None,
    } | ({"test_curve": test_curve} if test_rows is not None else {})


def child_accuracy(spec: dict) -> None:
    """One accuracy row: load, (train), save, reload from the saved checkpoint, evaluate."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import dkm_hf

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    train_rows, val_rows, test_rows = tweet_sentiment()
    train_rows = train_rows[: spec["train_size"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    method, src, out = spec["method"], spec["src"], spec["out"]
    kwargs = {"num_labels": 3} if method == "dense" else {}
    if method in ("dkm", "ptq"):
        kwargs["dkm_config"] = dkm_hf.DKMConfig(**spec["dkm"])
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
    result = {"load_s": time.perf_counter() - start}
    with tempfile.TemporaryDirectory() as tmp:
        if method == "coremltools":
            model = coremltools_dkm(model, tokenizer, train_rows, val_rows, spec, result, tmp)
        elif method == "ptq" and spec.get("kmeans") == "dkm_hf":
            pass  # palettize() below initialises the centroids: dkm_hf's k-means, the hard model of DKM's step 0
        elif method == "ptq":
            from ptq_kmeans import palettize_post_training

            palettize_post_training(model)
        else:
            teacher = AutoModelForSequenceClassification.from_pretrained(src) if spec.get("teacher") else None
            tests = test_rows if spec.get("test_curve") else None
            result |= fit(model, tokenizer, train_rows, val_rows, spec, f"{tmp}/run", teacher=teacher, test_rows=tests)
        if dkm_hf.get_dkm_config(model) is not None:
            dkm_hf.palettize(model)
        save_dir = out or f"{tmp}/saved"
        model.save_pretrained(save_dir)
        result["checkpoint_mb"] = sum(f.stat().st_size for f in Path(save_dir).glob("*.safetensors")) / 1e6
        reloaded = AutoModelForSequenceClassification.from_pretrained(save_dir)
        result["val_accuracy"] = evaluate(reloaded, tokenizer, val_rows, spec["max_len"])
        result["accuracy"] = evaluate(reloaded, tokenizer, test_rows, spec["max_len"])
        if method == "dense" and out:  # a later run of the same recipe can start from this model (--reuse-dense)
            (Path(out) / DENSE_RESULT).write_text(json.dumps({"spec": spec, "result": result}, indent=2))
    emit(result)


def coremltools_dkm(model, tokenizer, train_rows, val_rows, spec: dict, result: dict, tmp: str):
    """Train `model` with coremltools' DKMPalettizer (same Trainer, data, optimiser, schedule and best-model rule
    as the dkm_hf rows), finalize it, and return it as a dkm_hf model ready to save palettized.

    coremltools' `finalize` leaves dense weights that take at most 2^bits values per tensor; they are written into a
    dkm_hf model by the post-training k-means of `ptq_kmeans`, which recovers those values exactly (up to the
    float16 LUT), so the accuracy reported is that of the reloaded palettized checkpoint like every other row.
    `result` gets the largest weight change of that conversion and the values per tensor.
    """
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
    result |= fit(prepared, tokenizer, train_rows, val_rows, spec, f"{tmp}/run", step_hook=palettizer.step)
    final = palettizer.finalize(inplace=True)
    state = {k: v for k, v in final.state_dict().items() if "_COREML_" not in k}  # its export metadata
    final.save_pretrained(f"{tmp}/coremltools", state_dict=state)
    dkm = dkm_hf.DKMConfig(bits=spec["ct"]["n_bits"])
    model = AutoModelForSequenceClassification.from_pretrained(f"{tmp}/coremltools", dkm_config=dkm)
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


def row_bits(spec: dict) -> int | None:
    """The bit width of a compression row's spec; None for the dense model and the control."""
    return (spec.get("dkm") or {}).get("bits") or (spec.get("ct") or {}).get("n_bits")


def suite_accuracy(quick: bool, only_bits: tuple[int, ...] = (), stored: dict | None = None) -> dict:
    """The accuracy suite. With `only_bits` (and `stored`, the data of an earlier run), only the rows at those bit
    widths run; the dense model and every other row are taken from `stored`, each of whose specs must equal what the
    current recipe would run, so the merged table is one recipe."""
    minilm = minilm_path()
    recipe = QUICK if quick else FULL
    work = CACHE / ("accuracy_quick" if quick else "accuracy_full")
    work.mkdir(parents=True, exist_ok=True)
    dense_dir = work / "dense"
    train_rows, val_rows, test_rows = tweet_sentiment()
    base = {"tokenizer": str(minilm), "train_size": recipe["train_size"], "max_len": recipe["max_len"], "seed": 0}
    data = {
        "recipe": recipe,
        "train_used": len(train_rows[: recipe["train_size"]]),
        "train_available": len(train_rows),
        "val_size": len(val_rows),
        "test_size": len(test_rows),
        "runs": [],
        "notes": [],
    }

    lock = threading.Lock()

    def run(label, spec, timeout=ACCURACY_TIMEOUT_S):
        child_spec = base | spec
        res = run_suite_child("accuracy", child_spec, timeout_s=timeout)
        with lock:
            data["runs"].append({"label": label, "spec": child_spec, "timeout_s": timeout, "result": res})
            print(label, {k: v for k, v in res.items() if k != "log_tail"}, flush=True)
            (work / "partial.json").write_text(json.dumps(data, indent=2))  # what an interrupted run has measured
        return res

    dense_spec = {"method": "dense", "src": str(minilm), "out": str(dense_dir), "run": recipe["dense"]}
    stored_runs = {r["label"]: r for r in (stored or {}).get("runs", [])}
    if only_bits:
        data["notes"] = list(stored["notes"])

    def keep(label, spec):
        """A row of the earlier run, taken over as measured then: only if the current recipe would run it alike."""
        previous = stored_runs.get(label)
        if previous is None or previous["spec"] != base | spec:
            raise SystemExit(
                f"the stored row {label!r} was run with another recipe (or is missing): rerun the whole suite"
            )
        data["runs"].append(previous)
        return previous["result"]

    dense_result = dense_dir / DENSE_RESULT
    if only_bits:
        dense = keep("dense fine-tune", dense_spec)
    elif os.environ.get("BENCH_REUSE_DENSE") == "1" and dense_result.exists():
        # the dense fine-tune of an earlier run of the same recipe (its spec must match), reported as measured then
        previous = json.loads(dense_result.read_text())
        if previous["spec"] != base | dense_spec:
            raise SystemExit(f"{dense_result} was written for another recipe; remove it or unset BENCH_REUSE_DENSE")
        dense = previous["result"] | {"status": "ok"}
        data["runs"].append({"label": "dense fine-tune", "spec": previous["spec"], "result": dense})
        data["notes"].append(
            f"The dense fine-tune was reused from an earlier run of the same recipe ({dense_result})."
        )
    else:
        dense = run("dense fine-tune", dense_spec)
    if dense["status"] != "ok":
        data["notes"].append("the dense fine-tune failed; nothing else was run")
        return data
    # A trained checkpoint replaces the step-0 model (post-training k-means) only when it beats it on validation by
    # more than one binomial standard error at the dense model's validation accuracy.
    p = dense["val_accuracy"] / 100
    margin = round(100 * math.sqrt(p * (1 - p) / len(val_rows)), 2)
    phase_run = recipe["phase"] | {"initial_model_margin": margin}
    phase = {"src": str(dense_dir), "out": None, "run": phase_run}
    rows = []
    for bits in (4, 3, 2):
        # kmeans_restarts=4: the best of four k-means runs per LUT (the package default is one run)
        dkm = {
            "dkm": {"bits": bits, "kmeans_restarts": 4},
            "run": phase_run | recipe.get("phase_by_bits", {}).get(bits, {}),
        }
        rows += [
            (f"post-training k-means {bits} bits (scikit-learn)", phase | {"method": "ptq"} | dkm),
            (
                f"post-training k-means {bits} bits (dkm_hf: DKM's step 0)",
                phase | {"method": "ptq", "kmeans": "dkm_hf"} | dkm,
            ),
            (f"DKM {bits} bits", phase | {"method": "dkm"} | dkm),
            (f"DKM {bits} bits, distilled", phase | {"method": "dkm", "teacher": True} | dkm),
        ]
    rows.append(("control: the DKM phase without clustering", phase | {"method": "control"}))
    if not have_coremltools():
        data["notes"].append(ACCURACY_COREMLTOOLS_NOTE)
    elif not quick:
        data["notes"].append(COREMLTOOLS_FULL_NOTE)
    else:
        # Same Trainer, data, optimiser, schedule and best-model rule as the dkm_hf rows; coremltools' default tau.
        for bits in (4, 2):
            spec = phase | {"method": "coremltools", "ct": {"n_bits": bits}}
            rows.append((f"coremltools DKM {bits} bits", spec, COREMLTOOLS_ACCURACY_TIMEOUT_S))
    order = {label: i for i, (label, *_) in enumerate([("dense fine-tune",), *rows])}
    if only_bits:
        for label, spec, *_ in rows:
            if row_bits(spec) not in only_bits:
                keep(label, spec)
        rows = [row for row in rows if row_bits(row[1]) in only_bits]
    # The rows are independent one-thread processes; BENCH_JOBS=2 runs two at a time (a 2-core machine).
    jobs = max(1, int(os.environ.get("BENCH_JOBS", "1")))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda row: run(*row), rows))
    data["notes"] = list(dict.fromkeys(data["notes"]))  # a rerun keeps the earlier run's notes
    data["runs"].sort(key=lambda r: order[r["label"]])
    return data


def report_accuracy(data: dict) -> str:
    rows = []
    dense_acc = next((r["result"].get("accuracy") for r in data["runs"] if r["label"] == "dense fine-tune"), None)
    for r in data["runs"]:
        res, spec = r["result"], r["spec"]
        ok = res["status"] == "ok"
        bits = row_bits(spec) or 32
        rows.append(
            [
                r["label"],
                bits,
                f"{res['accuracy']:.2f}" if ok else outcome(res),  # 2,000 texts: one text is 0.05 points
                f"{res['accuracy'] - dense_acc:+.2f}" if ok and dense_acc is not None else None,
                f"{res['val_accuracy']:.1f}" if res.get("val_accuracy") is not None else None,
                res.get("best_step"),
                res.get("checkpoint_mb"),
                res.get("train_s"),
            ]
        )
    conversions = [
        f"{r['label']}: at most {r['result']['coremltools_max_values_per_tensor']} values per tensor, largest "
        f"weight change on conversion to the dkm_hf checkpoint {r['result']['conversion_max_abs_change']:.1e}"
        for r in data["runs"]
        if r["spec"].get("method") == "coremltools" and r["result"]["status"] == "ok"
    ]
    conversion_note = (
        "\ncoremltools rows: trained by `DKMPalettizer` in the same Trainer, finalized by coremltools, converted to a "
        "dkm_hf palettized checkpoint (k-means on <= 2^bits distinct values recovers them exactly, up to the float16 "
        "LUT) and reloaded from it. " + "; ".join(conversions) + ".\n"
        if conversions
        else ""
    )
    recipe = data["recipe"]
    dense, phase = recipe["dense"], recipe["phase"]
    by_bits = ", ".join(
        f"{bits} bits: {run['steps']}" for bits, run in recipe.get("phase_by_bits", {}).items() if "steps" in run
    )
    by_bits = f" ({by_bits})" if by_bits else ""
    margins = {r["spec"]["run"].get("initial_model_margin") for r in data["runs"] if r["spec"].get("method") == "dkm"}
    margin_text = (
        f", a trained one replacing the step-0 model only when more than {margins.pop()} points better (one standard "
        "error of the validation accuracy: DKMTrainingArguments.initial_model_margin)"
        if len(margins) == 1 and None not in margins
        else ""
    )
    evaluated = (
        "evaluated at step 0 and at the last step only"
        if phase["eval_steps"] == "end"
        else f"evaluated every {phase['eval_steps']} steps and at step 0"
    )
    header = [
        "method",
        "bits",
        "test accuracy (%)",
        "vs dense (points)",
        "validation (%)",
        "best step",
        "checkpoint MB",
        "train (s)",
    ]
    return (
        f"all-MiniLM-L6-v2, tweet sentiment (3 classes): {data['train_used']} of {data['train_available']} "
        f"deduplicated training texts, {data['val_size']} validation and {data['test_size']} test texts, max length "
        f"{recipe['max_len']}. Dense: {dense['epochs']} epoch(s), batch {dense['batch']}, AdamW lr {dense['lr']}, "
        f"warm-up {dense['warmup']:.0%} then linear decay. Every other row starts from that dense model: "
        f"{phase['steps']} steps{by_bits}, batch {phase['batch']}, AdamW lr {phase['lr']} linear decay to 0, "
        "DKMConfig's default tau (0.01 of each LUT's weight variance at 4 bits, 0.05 at 3 and 2), "
        "DKMTrainingArguments' default tau schedule (flat at 4 bits, a cosine to a tenth at 3 and 2) and "
        "kmeans_restarts=4 (the best of 4 k-means runs per LUT at initialisation); the best hard model by "
        f"validation accuracy ({evaluated}) is kept{margin_text}; "
        "the control row runs plain Trainer, which evaluates step 0 (eval_on_start) but saves no checkpoint there, "
        "so it keeps its best trained checkpoint; "
        "distilled rows add DKMTrainer's KL term to the dense model (alpha 0.5, temperature 2). Post-training "
        "k-means: scikit-learn's (best of 3 by inertia), and "
        "dkm_hf's own initialisation, which is the hard model of every DKM row at step 0. Test accuracy measured on "
        "the model reloaded from its saved checkpoint (palettized for every compressed row).\n\n"
        + markdown_table(header, rows)
        + "\n"
        + conversion_note
    )
