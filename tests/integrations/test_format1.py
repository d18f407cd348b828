"""Checkpoints written by the previous release (format version 1, before weights replaced module types): a tiny
tied Llama at 3 bits with per-channel scales, as a palettized checkpoint and as a training checkpoint, with the
logits that release computed.

The logits were computed on another CPU: its kernels sum in another order (vector width, blocking), so they are
compared within float reordering, not bit for bit. The longest sums have 24 terms (hidden 16, MLP 24, one
layer, then the LM head); through the few chained layers that stays within 4 x 64 U of the largest logit (conftest.U;
measured: 1.3 U). A wrong LUT entry, index or scale moves logits by orders of magnitude more."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import U, assert_within
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import dkm_hf

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "format1"


def test_a_palettized_checkpoint_of_the_previous_release_loads_and_computes_the_same_logits():
    expected = load_file(FIXTURES / "expected.safetensors")
    model = LlamaForCausalLM.from_pretrained(FIXTURES / "palettized", dkm_inference_mode="dense").eval()
    assert len(dkm_hf.palettized_modules(model)) == 9 and model.lm_head.tied_source is model.model.embed_tokens
    with torch.no_grad():
        logits, scale = model(expected["input_ids"]).logits, expected["logits"].abs().max().item()
        assert_within(logits, expected["logits"], 4 * 64 * U, scale, "palettized logits, dense decode")
        # packed (the default): 8 rows of input take the fused LUT gemv, whose float32 sums run in another order
        packed = dkm_hf.set_inference_mode(model, "packed")(expected["input_ids"]).logits
    torch.testing.assert_close(packed, expected["logits"], rtol=1e-5, atol=1e-6)


def test_a_training_checkpoint_of_the_previous_release_resumes_its_centroids():
    expected = load_file(FIXTURES / "expected.safetensors")
    model = LlamaForCausalLM.from_pretrained(FIXTURES / "train").eval()
    weights = dkm_hf.dkm_modules(model)
    assert len(weights) == 9 and all(w.dkm_ready for _, w in weights)
    with torch.no_grad():
        logits, scale = model(expected["input_ids"]).logits, expected["logits"].abs().max().item()
        assert_within(logits, expected["logits"], 4 * 64 * U, scale, "hard-model logits")
