"""transformers' own architectures through dkm_hf at lossless settings (tests/architectures.py says what is checked):
a named few in the fast suite, every model type of the causal-LM, sequence-classification and image-classification
mappings as a slow test (scripts/architecture_table.py writes the same run as docs/architectures.md)."""

from __future__ import annotations

import pytest
from architectures import all_cases, run_case

NAMED = [
    ("gemma3_text", "causal-lm"),  # a scaled word embedding (embed_scale), sliding-window layers
    ("gemma", "causal-lm"),
    ("bart", "causal-lm"),  # learned positional embeddings with extra forward arguments
    ("opt", "causal-lm"),
    ("xglm", "causal-lm"),
    ("mixtral", "causal-lm"),  # stacked 3-D experts and a router that returns a tuple
    ("qwen3_moe", "causal-lm"),
    ("vit", "image-classification"),  # checkpoint keys renamed by transformers
    ("gpt2", "sequence-classification"),  # transformers' Conv1D
    ("roberta", "causal-lm"),  # an LM head whose bias is tied to another module's parameter
]


def _check(model_type: str, head: str) -> None:
    result = run_case(model_type, head)
    assert result.outcome == "pass", f"{model_type} ({head}): {result.outcome}: {result.detail}"
    assert result.errors["hard"] <= 1e-3 and result.errors["reloaded"] <= 1e-3
    assert result.coverage >= 0.95 and result.errors["missing_grads"] == 0


@pytest.mark.parametrize(("model_type", "head"), NAMED)
def test_named_architectures_are_intact(model_type, head):
    _check(model_type, head)


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "head"), [c for c in all_cases() if c not in NAMED])
def test_every_architecture_passes_or_is_not_built(model_type, head):
    """Every model type that the generic small config builds passes; dkm_hf never changes a model silently."""
    result = run_case(model_type, head)
    if result.outcome == "not built":
        pytest.skip(result.detail)
    assert result.outcome == "pass", f"{result.outcome}: {result.detail}"
