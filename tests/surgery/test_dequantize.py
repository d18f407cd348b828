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


def test_transformers_dequantize_leaves_no_dkm_config_behind():
    """`model.dequantize()` (transformers') of a prepared model kept its DKMConfig: `get_dkm_config` still returned
    it and a second `prepare` was refused as "already prepared"."""
    from conftest import TINY

    cls, make_config = TINY["llama"]
    model = dkm_hf.prepare(cls(make_config()), DKMConfig(bits=3, weight_threshold=0))
    model.dequantize()
    assert dkm_hf.get_dkm_config(model) is None and not dkm_hf.dkm_modules(model)
    dkm_hf.prepare(model, DKMConfig(bits=2, weight_threshold=0))
    assert {s.layout.bits for _, s in dkm_hf.dkm_modules(model)} == {2}
    hard = dict(dkm_hf.dkm_modules(model))["model.layers.0.self_attn.q_proj"].hard_weight()
    model.dequantize(dtype=torch.bfloat16)  # the dtype asked for (before: ignored)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, hard.to(torch.bfloat16), rtol=0, atol=0)


def test_a_dense_model_built_from_a_dkm_models_config_is_refused_by_name(tiny_dir):
    """`from_config(dkm_model.config)`: a dense model whose config carries the DKMConfig; prepare said "already
    prepared for DKM"."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=2, weight_threshold=0))
    fresh = AUTO["llama"].from_config(model.config)
    assert not dkm_hf.dkm_modules(fresh)
    with pytest.raises(ValueError, match="no DKM module but its config carries a DKMConfig"):
        dkm_hf.prepare(fresh, DKMConfig(bits=2, weight_threshold=0))
    del fresh.config.quantization_config
    assert dkm_hf.dkm_modules(dkm_hf.prepare(fresh, DKMConfig(bits=2, weight_threshold=0)))


@pytest.mark.parametrize("palettized", [False, True])
def test_dequantizing_the_tied_head_alone_gives_it_a_dense_copy(tiny_dir, palettized, caplog):
    """README: `dkm_hf.dequantize(model.lm_head)` decodes one module (e.g. for peft's modules_to_save). With the head
    tied to the clustered embedding it failed with a bare KeyError; the head now gets its own dense copy (a warning
    says the tie is gone) and the model computes as before."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0)).eval()
    if palettized:
        dkm_hf.palettize(model)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    with caplog.at_level("WARNING"):
        dkm_hf.dequantize(model.lm_head)
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.lm_head.weight, torch.nn.Parameter)
    assert "no longer tied" in caplog.text
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, dkm_hf.PalettizedMixin if palettized else dkm_hf.DKMMixin)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_palettized_view_puts_back_a_weight_the_root_module_holds():
    """A clustered parameter of the root module itself (not a `weight` of a child) was palettized in place by the
    view and never put back: gone from named_parameters, still palettized after the view (which save_model uses)."""

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.randn(16, 16))
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x @ self.proj)

    torch.manual_seed(0)
    model = dkm_hf.prepare(Root(), DKMConfig(bits=2, weight_threshold=0, target_modules=["proj", "fc"]))
    before = sorted(n for n, _ in model.named_parameters())
    with dkm_hf.palettized_view(model) as view:
        assert {n for n, _ in dkm_hf.palettized_modules(view)} == {"proj", "fc"}
    assert sorted(n for n, _ in model.named_parameters()) == before
    assert {n for n, _ in dkm_hf.dkm_modules(model)} == {"proj", "fc"} and not dkm_hf.palettized_modules(model)
    model.train()(torch.randn(2, 16)).sum().backward()
    assert model.proj.grad is not None


def test_palettized_view_of_a_root_holding_a_weight_keeps_its_hook_handles():
    """The view put the root's dicts back as copies: a handle taken before it removed nothing afterwards."""

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return x @ self.proj

    torch.manual_seed(0)
    model = dkm_hf.prepare(Root(), DKMConfig(bits=2, weight_threshold=0, target_modules=["proj"]))
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    with dkm_hf.palettized_view(model):
        pass
    handle.remove()
    model(torch.randn(2, 16))
    assert calls == []


def test_a_head_dequantized_alone_is_not_tied_back_to_the_clustered_embedding(tiny_dir):
    """After `dequantize(model.lm_head)` the tie map still named the embedding: a later `tie_weights()` (accelerate's
    FSDP2 preparation calls it) pointed the head at the embedding's unclustered parameter (logits 0.08 off)."""
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0)).eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    dkm_hf.dequantize(model.lm_head)
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)
