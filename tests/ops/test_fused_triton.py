"""The Triton DKM kernels (dkm_hf/ops/fused_triton.py) in interpreter mode, on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (extra `triton`)")
def test_triton_kernels_in_interpreter_mode_match_reference():
    """The Triton kernels on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is imported: a
    fresh process (triton_interpreter_check.py: per-tensor, grouped and per-row shapes, d = 2, early stop, values,
    final centroids and gradients within 1e-4 relative of the chunked path)."""
    script = os.path.join(os.path.dirname(__file__), "triton_interpreter_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
