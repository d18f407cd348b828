"""LoRA adapters (peft) on a frozen palettized model: train, save the adapters alone, reload them onto it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import AUTO, tiny_inputs, tiny_model
from safetensors.torch import load_file

import dkm_hf
from dkm_hf import DKMConfig

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tiny_inputs("llama")).logits


def _palettized_buffers(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if "_lut" in name or "_indices" in name}


@pytest.fixture
def palettized_dir(tiny_dir, tmp_path) -> Path:
    model = AUTO["llama"].from_pretrained(tiny_dir("llama"), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    return tmp_path / "pal"


@pytest.fixture
def trained(palettized_dir):
    """A LoRA model on the reloaded palettized checkpoint after 4 AdamW steps, with its losses and the buffers and
    adapters it started from."""
    model = _lora(AUTO["llama"].from_pretrained(palettized_dir))
    before = _palettized_buffers(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = tiny_inputs("llama", batch=4)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    return model, before, start, losses


def test_only_the_adapters_train_and_the_palettized_weights_stay_buffers(trained):
    model, before, start, losses = trained
    assert losses[-1] < losses[0] - 0.01, losses
    weights = dkm_hf.palettized_modules(model)
    assert len(weights) == 2 * 7 + 2  # every projection, the embeddings and the lm_head tied to them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(start) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    for name, value in start.items():
        assert not torch.equal(value, model.get_parameter(name)), f"{name} did not change"
    for name, buffer in _palettized_buffers(model).items():
        assert torch.equal(buffer, before[name]), f"{name} changed"
    for name, state in weights:
        assert state.param not in state.module._parameters, name
        assert not isinstance(getattr(state.module, state.param), torch.nn.Parameter), name
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_grads == []


def test_saved_adapters_reload_onto_the_palettized_checkpoint(trained, palettized_dir, tmp_path):
    model, _, start, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(start) and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in start.values())
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4

    base = AUTO["llama"].from_pretrained(palettized_dir)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), _logits(model))
    with reloaded.disable_adapter():
        assert not torch.equal(_logits(reloaded), _logits(model))  # the adapters are in effect


def test_merging_into_palettized_weights_is_refused_and_dequantize_first_merges(trained):
    model, _, _, _ = trained
    expected = _logits(model)
    with pytest.raises(ValueError, match=r"cannot merge adapters into palettized weights \(.*q_proj.* and \d+ more"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="dkm_hf.dequantize"):
        model.merge_adapter()
    assert torch.equal(_logits(model), expected)  # nothing changed

    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    with pytest.raises(ValueError, match=r"cannot merge adapters into palettized weights \(a Linear adapter layer"):
        layers[0].merge()  # a layer's own merge: it would mark the layer merged and drop the adapter from the output
    assert not any(layer.merged for layer in layers)
    assert torch.equal(_logits(model), expected)

    dkm_hf.dequantize(model.get_base_model())
    merged = model.merge_and_unload()
    assert not dkm_hf.palettized_modules(merged)
    assert all(not n.count("lora") for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)


def test_dequantize_of_the_peft_model_itself_merges_into_a_plain_checkpoint(trained, tmp_path):
    """`dkm_hf.dequantize(peft_model)` decodes the base model in place and drops its quantizer, so the merged model
    saves as a plain dense checkpoint (before: a "train" checkpoint without centroids that did not reload)."""
    model, _, _, _ = trained
    expected = _logits(model)
    assert dkm_hf.dequantize(model) is model
    assert not dkm_hf.palettized_modules(model)
    merged = model.merge_and_unload()
    assert getattr(merged, "hf_quantizer", None) is None
    assert getattr(merged.config, "quantization_config", None) is None
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AUTO["llama"].from_pretrained(tmp_path / "merged")
    assert not dkm_hf.palettized_modules(reloaded) and not dkm_hf.dkm_modules(reloaded)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "targets"), [("llama", TARGETS), ("gpt2", ["c_attn", "c_proj", "c_fc"])])
def test_backward_decodes_again_instead_of_keeping_the_decoded_weights(tiny_dir, tmp_path, name, targets):
    """Packed mode keeps no decoded weight from the forward to the backward pass, and its gradients are those of
    dense mode (where the decoded weight is kept and autograd keeps it too)."""
    model = AUTO[name].from_pretrained(tiny_dir(name), dkm_config=DKMConfig(bits=3, weight_threshold=0))
    dkm_hf.palettize(model).save_pretrained(tmp_path / "pal")
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(AUTO[name].from_pretrained(tmp_path / "pal"), config).eval()  # GPT-2: no dropout
    inputs = tiny_inputs(name)
    shapes = {tuple(getattr(s.module, s.param).shape) for _, s in dkm_hf.palettized_modules(model)}

    def lora_grads(mode: str) -> tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]:
        dkm_hf.set_inference_mode(model, mode)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, [shape for shape in saved if shape in shapes]

    packed, kept_packed = lora_grads("packed")
    dense, kept_dense = lora_grads("dense")
    assert kept_packed == [] and len(kept_dense) >= len(targets)
    assert packed.keys() == dense.keys() and len(packed) >= 2 * 2 * len(targets)
    for key, grad in packed.items():
        torch.testing.assert_close(grad, dense[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")
        assert grad.abs().sum() > 0, key


@pytest.mark.parametrize("order", ["dkm_hf first", "peft first"])
def test_the_merge_check_is_installed_whichever_package_is_imported_first(order):
    first, second = ("dkm_hf", "peft") if order == "dkm_hf first" else ("peft", "dkm_hf")
    code = (
        f"import {first}, {second}, peft.tuners.tuners_utils as t, peft.tuners.lora.layer as lora; "
        "print(getattr(t.BaseTuner._check_merge_allowed, '_dkm_hf_patched', False), "
        "lora.check_adapters_to_merge is t.check_adapters_to_merge, "
        "getattr(t.check_adapters_to_merge, '_dkm_hf_patched', False))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True True", out.stderr


def test_modules_to_save_of_a_palettized_module_is_refused_until_it_is_decoded(palettized_dir):
    """A trainable copy (`modules_to_save`) of a module with palettized weights would train nothing (they are
    buffers), silently; refused, naming the way out, which then trains a dense copy."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"], lora_dropout=0.0)
    model = AUTO["llama"].from_pretrained(palettized_dir)
    with pytest.raises(ValueError, match=r"modules_to_save: a \w+ holding palettized weights.*dkm_hf.dequantize"):
        peft.get_peft_model(model, config)
    model = AUTO["llama"].from_pretrained(palettized_dir)
    for layer in model.model.layers:
        dkm_hf.dequantize(layer.self_attn.o_proj)
    lora = peft.get_peft_model(model, config)
    copies = [n for n, p in lora.named_parameters() if p.requires_grad and "o_proj.modules_to_save" in n]
    assert len(copies) == len(model.model.layers)


def test_target_parameters_naming_palettized_experts_are_refused():
    """peft's target_parameters adapt parameters; palettized stacked experts are buffers, and peft skipped them
    without a word (only q_proj trained). Refused naming the weight; on the dense model the experts get adapters."""
    import peft
    from transformers import MixtralConfig, MixtralForCausalLM

    def mixtral():
        torch.manual_seed(0)
        config = MixtralConfig(
            vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        return MixtralForCausalLM(config)

    lora = {"r": 4, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
    dense = peft.get_peft_model(mixtral(), peft.LoraConfig(**lora))
    assert any("experts" in n for n, p in dense.named_parameters() if p.requires_grad)
    config = DKMConfig(bits=4, granularity="per_grouped_channel", group_size=1, weight_threshold=0)
    palettized = dkm_hf.palettize(dkm_hf.prepare(mixtral(), config))
    with pytest.raises(ValueError, match=r"target_parameters name palettized weights \(model.layers.0.mlp.experts"):
        peft.get_peft_model(palettized, peft.LoraConfig(**lora))


def test_lora_on_a_dkm_model_resumes_from_its_adapter_checkpoints(tmp_path, caplog):
    """Trainer saves a peft model's checkpoints as its adapter (no config.json, no model weights); DKMTrainer's
    resume check refused every one as "not saved completely". A resume now continues the uninterrupted run; and
    save_model, which writes the adapter only, says that the palettized base is not in it."""
    from transformers import TrainingArguments

    data = _lm_rows(16)

    def run(out, resume=None):
        model = dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=3, weight_threshold=0))
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        args = TrainingArguments(
            output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
            disable_tqdm=True, logging_steps=1, seed=0, data_seed=0,
        )  # fmt: skip
        trainer = dkm_hf.DKMTrainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    full, losses = run(tmp_path / "full")
    resumed, resumed_losses = run(tmp_path / "full", resume=True)
    assert resumed.state.global_step == 4 and resumed_losses[2:] == losses[2:]
    with caplog.at_level("WARNING"):
        full.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists() and "writes its adapter only" in caplog.text


def _lm_rows(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": (ids := torch.randint(1, 99, (9,), generator=g)), "labels": ids} for _ in range(count)]
