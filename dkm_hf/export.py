"""Export a palettized model to other runtimes, keeping dkm_hf's own LUTs and indices (no re-clustering).

    import dkm_hf.export
    dkm_hf.export.to_coreml(model_or_dir, {"input_ids": ids}, "model.mlpackage")   # needs dkm_hf[coreml]

`to_coreml` writes an .mlpackage whose clustered weights are Core ML `constexpr_lut_to_dense` ops (with
`constexpr_blockwise_shift_scale` for per-channel scales); see `dkm_hf.integrations.coreml` for the layouts each
deployment target holds. The command line: `dkm-hf export --coreml DIR OUT.mlpackage [--example-shape ...]`.
"""

from __future__ import annotations

from .integrations.coreml import to_coreml

__all__ = ["to_coreml"]
