"""LoRA adapters (peft) on a frozen palettized model: train, save the adapters alone, reload them onto it."""

from __future__ import annotations

import copy
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
        "import peft.peft_model as p, peft.tuners.mixed.model as mixed; "
        "print(getattr(t.BaseTuner._check_merge_allowed, '_dkm_hf_patched', False), "
        "lora.check_adapters_to_merge is t.check_adapters_to_merge, "
        "getattr(t.check_adapters_to_merge, '_dkm_hf_patched', False), "
        "getattr(p.PeftModel._setup_prompt_encoder, '_dkm_hf_patched', False), "
        "getattr(mixed.MixedModel._replace_module, '_dkm_hf_patched', False))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True True True True", out.stderr


def test_modules_to_save_of_a_palettized_module_is_refused_until_it_is_decoded(palettized_dir, tmp_path):
    """A trainable copy (`modules_to_save`) of a module with palettized weights would train nothing (they are
    buffers), silently; refused before the model changes (before: after q_proj's adapters were in), naming the way
    out, which then trains a dense copy."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"], lora_dropout=0.0)
    model = AUTO["llama"].from_pretrained(palettized_dir)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"modules_to_save: model.layers.0.self_attn.o_proj, a PalettizedLinear .*"
                       r"dkm_hf.dequantize"):  # fmt: skip
        peft.get_peft_model(model, config)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    model = AUTO["llama"].from_pretrained(palettized_dir)
    for layer in model.model.layers:
        dkm_hf.dequantize(layer.self_attn.o_proj)
    lora = peft.get_peft_model(model, config)
    copies = [n for n, p in lora.named_parameters() if p.requires_grad and "o_proj.modules_to_save" in n]
    assert len(copies) == len(model.model.layers)
    lora.save_pretrained(tmp_path / "adapter")  # its dense copies meet palettized modules: named, not a KeyError
    with pytest.raises(ValueError, match=r"holds no .*o_proj.weight_lut: it was trained with a dense copy"):
        peft.PeftModel.from_pretrained(AUTO["llama"].from_pretrained(palettized_dir), tmp_path / "adapter")


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
    expected = _logits(full.model)
    base = dkm_hf.palettize(copy.deepcopy(full.model.get_base_model()))  # with the adapters' layers in it: refused
    with pytest.raises(ValueError, match=r"holds peft adapter layers \(model.layers.0.self_attn.q_proj and more"):
        base.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    dkm_hf.palettize(copy.deepcopy(full.model).unload()).save_pretrained(tmp_path / "base")  # the warning's recipe
    reloaded = peft.PeftModel.from_pretrained(AUTO["llama"].from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), expected)


def test_a_dkm_models_copy_to_save_reloads_for_inference_onto_the_palettized_base(tmp_path):
    """`modules_to_save` of a clustered module on a DKM model trains a DKM copy, which palettizes with the model; its
    adapter (the copy's LUT and indices) loads onto the palettized base for inference (before: refused as a copy to
    train), equal to the trained model."""
    model = dkm_hf.prepare(tiny_model("llama"), DKMConfig(bits=3, weight_threshold=0))
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    inputs = tiny_inputs("llama", batch=4)
    lora.train()
    for _ in range(2):
        lora(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dkm_hf.palettize(lora.get_base_model())
    expected = _logits(lora)
    lora.save_pretrained(tmp_path / "adapter")
    base = copy.deepcopy(lora).unload()
    base.save_pretrained(tmp_path / "base")
    reloaded = peft.PeftModel.from_pretrained(AUTO["llama"].from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), expected)


@pytest.mark.parametrize("tuner", ["ia3", "loha", "mixed"])
def test_unload_of_other_tuners_puts_the_palettized_layers_back(palettized_dir, tuner):
    """`unload()` of a tuner without its own replacement (or with MixedModel's) assigned the base layer's weight to
    itself, which a palettized module refuses: it failed half-way, the model half unloaded. Now the base model comes
    back exactly."""
    configs = {
        "ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    }
    model = AUTO["llama"].from_pretrained(palettized_dir)
    expected = _logits(model)
    if tuner == "mixed":
        mixed = peft.get_peft_model(model, configs["loha"], mixed=True)
        mixed.add_adapter("lora", peft.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
        unloaded = mixed.unload()
    else:
        unloaded = peft.get_peft_model(model, configs[tuner]).unload()
    assert not dkm_hf.integrations.peft_patches.adapter_layers(unloaded)
    assert torch.equal(_logits(unloaded), expected)


def test_lora_on_palettized_and_clustered_convolutions():
    """peft builds a Conv2d's adapters as `type(base_layer)(...)`: dkm_hf's generated class, built without clustered
    or palettized weights, failed at its first `.to()`. It now builds the base class; the adapters train and only
    they change."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    for palettize in (False, True):
        model = dkm_hf.prepare(copy.deepcopy(net), DKMConfig(bits=3, weight_threshold=0))
        model = dkm_hf.palettize(model) if palettize else model
        lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
        assert type(lora.base_model.model[0].lora_A["default"]) is torch.nn.Conv2d
        frozen = {n: t.clone() for n, t in lora.state_dict().items() if "lora_" not in n}
        optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(3):
            loss = lora(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        after = lora.state_dict()
        assert all(torch.equal(after[n], t) for n, t in frozen.items() if not n.endswith("centroids"))


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_prompt_tuning_finds_a_palettized_embedding(palettized_dir, init):
    """peft looks for the word embeddings by name or by a parameter of the vocabulary's size: a palettized one (LUT
    and indices) was not found, and the first forward failed ('NoneType' object is not callable)."""
    model = AUTO["llama"].from_pretrained(palettized_dir)
    before = _palettized_buffers(model)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=init)
    prompt = peft.get_peft_model(model, config)
    assert prompt.word_embeddings is model.get_input_embeddings() and not hasattr(model, "embeddings")
    inputs = tiny_inputs("llama", batch=4)
    optimizer = torch.optim.SGD([p for p in prompt.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for _ in range(3):
        loss = prompt(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, before[n]) for n, b in _palettized_buffers(model).items())


@pytest.mark.skipif(
    tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22), reason="transformers' add_adapter: peft >= 0.22"
)
def test_adapters_added_through_transformers_save_alone(palettized_dir, tmp_path):
    """transformers' own `add_adapter` on a palettized model: its save_pretrained writes the adapter only, which
    dkm_hf's save took for a palettized checkpoint (and failed reading the config.json it had not written)."""
    model = AUTO["llama"].from_pretrained(palettized_dir)
    model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = AUTO["llama"].from_pretrained(palettized_dir)
    reloaded.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(_logits(reloaded), expected)


def _lm_rows(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": (ids := torch.randint(1, 99, (9,), generator=g)), "labels": ids} for _ in range(count)]
