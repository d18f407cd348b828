from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import AUTO, tiny_inputs

import dkm_hf
from dkm_hf import DKMConfig


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("finalized", [True, False])
def test_dequantized_model_loads_without_dkm_hf(tiny_dir, tmp_path, name, finalized):
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=DKMConfig(bits=3, weight_threshold=0)).eval()
    if finalized:
        dkm_hf.palettize(model)
    inputs = tiny_inputs(name)
    with torch.no_grad():
        expected = model(**inputs).logits
    plain = dkm_hf.dequantize(model)
    assert not dkm_hf.dkm_modules(plain) and not dkm_hf.palettized_modules(plain)
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=0, atol=1e-6 if finalized else 1e-3)
    plain.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(plain(**inputs).logits.detach(), tmp_path / "expected.pt")
    script = f"""
import sys, torch, transformers
torch.set_num_threads(1)  # the same reduction order as the test process
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
cls = AutoModelForCausalLM if {name!r} == "gpt2" else AutoModelForSequenceClassification
model, info = cls.from_pretrained({str(tmp_path / "plain")!r}, output_loading_info=True)
assert "dkm_hf" not in sys.modules
assert not info["missing_keys"] and not info["unexpected_keys"], info
out = model(**torch.load({str(tmp_path / "inputs.pt")!r})).logits
assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_trainer_evaluates_a_reloaded_palettized_model(tiny_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = AUTO["bert"].from_pretrained(tiny_dir("bert"), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    reloaded = AUTO["bert"].from_pretrained(tmp_path / "pal")
    data = [{"input_ids": torch.randint(1, 99, (9,)), "labels": torch.tensor(i % 3)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True)
    metrics = Trainer(model=reloaded, args=args, eval_dataset=data).evaluate()
    assert metrics["eval_loss"] > 0


@torch.no_grad()
def test_dequantize_after_a_save_and_after_a_cast(tiny_dir, tmp_path):
    """dequantize keeps the dtype the model computes in: after a save (config.dtype then holds a string, which was
    passed to model.to and failed half-way, the quantizer left on a model with dense layers) and after a cast made
    since loading (which it undid: bfloat16 back from float32, or float32 doubling a bfloat16 model's memory)."""
    from transformers import AutoModelForCausalLM

    ids = tiny_inputs("llama")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(weight_threshold=0))
    model.save_pretrained(tmp_path / "train")
    expected = model.eval()(ids).logits
    plain = dkm_hf.dequantize(model)
    assert getattr(plain, "hf_quantizer", None) is None and not dkm_hf.dkm_modules(plain)
    torch.testing.assert_close(plain(ids).logits, expected)
    dkm_hf.palettize(AutoModelForCausalLM.from_pretrained(tmp_path / "train")).save_pretrained(tmp_path / "pal")
    for loaded, cast in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "pal", dtype=loaded).to(cast)
        model.save_pretrained(tmp_path / "again")
        expected = model(ids).logits
        plain = dkm_hf.dequantize(model)
        assert plain.model.layers[0].mlp.up_proj.weight.dtype == cast and plain(ids).logits.dtype == cast
        torch.testing.assert_close(plain(ids).logits, expected)
