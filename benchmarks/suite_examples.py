"""The examples suite: the vision and causal-LM examples run with their defaults, so that the package defaults are
measured on MobileNetV2 / Fashion-MNIST and on SmolLM2-135M (perplexity) by the benchmarks, not only by hand.

Each row is one example's `main()` with its defaults and an output folder in the benchmark cache, in a child
process (`run.py --child examples <spec>`); the report is the example's own results table (results.md), every
compressed model reloaded from its palettized checkpoint. --quick: the vision example only.

    python benchmarks/run.py --suite examples          # vision (~5 min) + causal LM (~15 min) on 2 free cores
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from common import CACHE, outcome, run_suite_child
from measure import emit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = {
    "vision": EXAMPLES / "vision" / "run_image_classification_dkm.py",
    "causal_lm": EXAMPLES / "causal_lm" / "run_clm_dkm.py",
}
EXAMPLES_TIMEOUT_S = 3 * 3600


def child_examples(spec: dict) -> None:
    """One example's main(argv) with its output in the cache; emits its results and results.md."""
    script = SCRIPTS[spec["example"]]
    sys.path.insert(0, str(EXAMPLES))
    module_spec = importlib.util.spec_from_file_location(f"example_{spec['example']}", script)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # its dataclasses look their module up there
    module_spec.loader.exec_module(module)
    out = Path(spec["out"])
    results = module.main([*spec["argv"], "--output_dir", str(out)])
    emit({"results": results, "markdown": (out / "results.md").read_text()})


def suite_examples(quick: bool) -> dict:
    rows = [("vision", [])] + ([] if quick else [("causal_lm", [])])
    data = {"runs": [], "notes": []}
    for name, argv in rows:
        spec = {"example": name, "argv": argv, "out": str(CACHE / "examples" / name)}
        res = run_suite_child("examples", spec, timeout_s=EXAMPLES_TIMEOUT_S)
        command = f"python {SCRIPTS[name].relative_to(EXAMPLES.parent)} {' '.join(argv)}".strip()
        data["runs"].append({"example": name, "command": command, "spec": spec, "result": res})
        print(name, {k: v for k, v in res.items() if k not in ("log_tail", "results", "markdown")}, flush=True)
    return data


def report_examples(data: dict) -> str:
    parts = [
        "Each example with its defaults (the package's DKMConfig defaults plus the example's recipe), every "
        "compressed row reloaded from its palettized checkpoint; the example's own results table.\n"
    ]
    for r in data["runs"]:
        res = r["result"]
        parts.append(f"### `{r['command']}`\n")
        parts.append(res["markdown"] if res["status"] == "ok" else f"Not measured: {outcome(res)}.\n")
    return "\n".join(parts)
