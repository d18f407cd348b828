"""Run the architecture conformance check (tests/architectures.py) over every model type of transformers'
causal-LM, sequence-classification and image-classification mappings, and write the table to
docs/architectures.md (and the raw results to benchmarks/results/architectures.json).

    python scripts/architecture_table.py                 # every case (about an hour on 2 cores)
    python scripts/architecture_table.py llama:causal-lm vit:image-classification   # rerun these, merge
    python scripts/architecture_table.py --report-only                              # the table from the results
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from architectures import HEADS, all_cases, run_case  # noqa: E402


def table(results: list[dict]) -> str:
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [
        "# Architecture conformance",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}. Every model type of transformers' "
        "causal-LM, sequence-classification and image-classification mappings, built tiny from a generic small config "
        "(tests/architectures.py), loaded with `dkm_config=` at lossless settings (8 bits, one float32 LUT per output "
        "row, rows of <= 256 values). A case passes when (a) the hard model's logits equal the dense model's "
        "(relative error <= 1e-3: only float summation order is left), (b) a training step gives finite gradients to "
        "every clustered weight that gets one in the dense model, (c) the palettized checkpoint, saved and reloaded, "
        "equals the dense model, (d) >= 95% of the elements of >= 2-D parameters are clustered, and (e) at 2 bits "
        "the DKM model in eval mode equals its palettized model (every clustered weight is read inside its own "
        "module's forward).",
        "",
        "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ". `not built`: the model could "
        "not be built with the generic small config (the reason is transformers', before dkm_hf is involved); "
        "`error`: dkm_hf raised, naming the stage and the reason; `fail`: a check did not hold.",
        "",
        "Regenerate with `python scripts/architecture_table.py`.",
        "",
        "| model type | head | class | outcome | hard error | reloaded error | coverage | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["errors"]
        hard = f"{e['hard']:.1e}" if "hard" in e else ""
        reloaded = f"{e['reloaded']:.1e}" if "reloaded" in e else ""
        cov = f"{r['coverage']:.0%}" if r["outcome"] != "not built" else ""
        detail = r["detail"].replace("|", "/")
        lines.append(
            f"| {r['model_type']} | {r['head']} | {r['class_name']} | {r['outcome']} | {hard} | {reloaded} | {cov} "
            f"| {detail} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    if argv == ["--report-only"]:
        out = ROOT / "benchmarks" / "results" / "architectures.json"
        (ROOT / "docs" / "architectures.md").write_text(table(json.loads(out.read_text())))
        return
    cases = [tuple(a.split(":")) for a in argv] if argv else all_cases()
    out = ROOT / "benchmarks" / "results" / "architectures.json"
    results = json.loads(out.read_text()) if argv and out.exists() else []
    done = {(r["model_type"], r["head"]) for r in results}
    for model_type, head in cases:
        if head not in HEADS:
            raise SystemExit(f"unknown head {head!r} (one of {list(HEADS)})")
        start = time.time()
        result = asdict(run_case(model_type, head))
        result["seconds"] = round(time.time() - start, 1)
        if (model_type, head) in done:
            results = [r for r in results if (r["model_type"], r["head"]) != (model_type, head)]
        results.append(result)
        print(
            f"{model_type:28s} {head:24s} {result['outcome']:9s} {result['seconds']:6.1f}s {result['detail']}",
            flush=True,
        )
    results.sort(key=lambda r: (list(HEADS).index(r["head"]), r["model_type"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    (ROOT / "docs" / "architectures.md").write_text(table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
