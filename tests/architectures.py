"""The architecture conformance check: transformers' own model classes, built tiny from a generic small config, run
through dkm_hf at settings where clustering is lossless.

At 8 bits with one LUT per output row and rows of at most 256 values, 256 centroids cover every value of a row, so
the hard (and palettized) model must equal the dense one (float32 LUTs: relative 1e-3 of the largest logit leaves
room for float summation order only; float16 LUTs alone would round each weight by up to 2**-11). Each case
checks, on a model saved by transformers and loaded with `dkm_config=`:

    (a) the hard model's logits equal the dense model's;
    (b) one training step gives a finite gradient to every clustered weight that gets one in the dense model too;
    (c) the palettized checkpoint, saved and reloaded with plain `from_pretrained`, equals the dense model again;
    (d) at least 95% of the weights of parameters of >= 2 dimensions are clustered;
    (e) every clustered weight is read inside its own module's forward: at 2 bits (lossy), the DKM model in eval
        mode and its palettized model give the same logits (a weight read elsewhere would be the dense one in DKM
        and the decoded one when palettized).

`run_case` returns a `CaseResult`; `scripts/architecture_table.py` runs every model type and writes the table in
docs/architectures.md, tests/test_architectures.py runs a named few in the fast suite and all of them as `slow`.
"""

from __future__ import annotations

import copy
import math
import tempfile
import traceback
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

import dkm_hf

HEADS = {
    "causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence-classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "image-classification": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}
MAX_PARAMETERS = 4_000_000  # above this the generic small config did not make the model small: listed as not built
TOLERANCE = 1e-3  # relative to the largest logit (float32 LUTs here: what is left is float summation order)
LOSSLESS = {
    "bits": 8,
    "granularity": "per_grouped_channel",
    "group_size": 1,
    "weight_threshold": 0,
    "lut_dtype": "float32",
}
LOSSY = {"bits": 2, "weight_threshold": 0}
COVERAGE = 0.95
MAX_ROW = 256  # 8 bits: 256 centroids cover every value of a row of at most this many values

# A generic small config: every int field of these names is set (in every sub-config), lists are shortened.
SMALL = {
    "vocab_size": 99,
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "embed_dim": 32,
    "dim": 32,
    "d_embed": 32,
    "word_embed_proj_dim": 32,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "multi_query_group_num": 2,
    "head_dim": 8,
    "kv_channels": 8,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "intermediate_size": 40,  # grouped expert matmuls need rows of a multiple of 16 bytes
    "ffn_dim": 40,
    "encoder_ffn_dim": 40,
    "decoder_ffn_dim": 40,
    "n_inner": 40,
    "d_ff": 40,
    "d_kv": 8,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "max_seq_len": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "sliding_window": 16,
    "num_labels": 3,
}
LIST_FIELDS = {"hidden_sizes": 16, "depths": 1, "num_heads": 2, "embed_dims": 16, "dims": 16, "layer_types": None}
SEQUENCE = 8


@dataclass
class CaseResult:
    model_type: str
    head: str
    class_name: str
    outcome: str  # "pass", "fail" (a check did not hold), "error" (dkm_hf raised), "not built" (why)
    detail: str = ""
    parameters: int = 0
    coverage: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)


def _shrink(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for key, value in list(config.to_dict().items()):
        current = getattr(config, key, None)
        if isinstance(current, PretrainedConfig):
            _shrink(current, seen)
        elif isinstance(current, int) and not isinstance(current, bool) and current > 0:
            value = SMALL.get(key, _small_guess(key, current))
            if value != current:
                try:
                    setattr(config, key, value)
                except Exception:  # noqa: BLE001 - a read-only alias or a validated field
                    pass
        elif key in LIST_FIELDS and isinstance(current, (list, tuple)) and current:
            if key == "layer_types":
                setattr(config, key, list(current[:2]) * (1 if len(current) >= 2 else 2))
            elif all(isinstance(v, int) for v in current):
                setattr(
                    config,
                    key,
                    [
                        LIST_FIELDS[key] * (1 if key in ("depths", "num_heads") else i + 1)
                        for i in range(min(len(current), 2))
                    ],
                )
    for sub in ("text_config", "vision_config", "audio_config", "decoder", "encoder"):
        nested = getattr(config, sub, None)
        if isinstance(nested, PretrainedConfig):
            _shrink(nested, seen)


def _small_guess(key: str, value: int) -> int:
    """A small value for an int field not in SMALL, guessed from its name (sizes, counts, positions)."""
    name = key.lower()
    if "position" in name or "seq_len" in name or "max_length" in name:
        return min(value, 64)
    if any(word in name for word in ("intermediate", "ffn", "inner", "mlp_dim", "d_ff", "dff")):
        return min(value, 40)
    if any(word in name for word in ("size", "_dim", "hidden", "channels", "features", "width", "rank", "embd")):
        if any(word in name for word in ("vocab", "kernel", "patch", "image", "window", "chunk", "state", "conv")):
            return value
        return min(value, 32)
    if "expert" in name and name.startswith(("num", "n_")):
        return min(value, 4)
    if "layers" in name and name.startswith(("num", "n_")):
        return min(value, 2)
    if "heads" in name and name.startswith(("num", "n_")):
        return min(value, 4)
    return value


def tiny_config(model_type: str, head: str) -> PretrainedConfig:
    config = CONFIG_MAPPING[model_type]()
    _shrink(config, set())
    pad = getattr(config, "pad_token_id", None)
    if not isinstance(pad, int) or pad >= SMALL["vocab_size"]:
        config.pad_token_id = 0
    for key in ("bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= SMALL["vocab_size"]:
            setattr(config, key, 1)
    if head != "causal-lm":
        config.num_labels = 3
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return config


def model_class(model_type: str, head: str) -> type:
    import transformers

    return getattr(transformers, HEADS[head][model_type])


def inputs_for(config: PretrainedConfig, head: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if head == "image-classification":
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or SMALL["vocab_size"]
    ids = torch.randint(2, min(vocab, SMALL["vocab_size"]), (2, SEQUENCE), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def coverage(model: torch.nn.Module) -> tuple[float, list[str]]:
    """Share of the elements of >= 2-D parameters but biases (each shared one once) held by clustered weights; and
    the names of the >= 2-D weights that are not clustered."""
    clustered = {id(w.weight) for _, w in dkm_hf.dkm_modules(model)}
    total = covered = 0
    left: list[str] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if param.dim() < 2 or name.endswith("bias") or id(param) in seen:  # biases stay float (2-D: GPT-OSS's)
            continue
        seen.add(id(param))
        total += param.numel()
        if id(param) in clustered:
            covered += param.numel()
        else:
            left.append(name)
    return (covered / total if total else 1.0), left


def _row_length(name: str, param: torch.Tensor) -> int:
    """Values per LUT row of a weight with per-row LUTs (both orientations: transformers' Conv1D is transposed)."""
    if param.dim() == 3 and not name.endswith("weight"):
        return max(param.shape[-1], param.shape[-2])
    return max(param[0].numel(), param.shape[0] if param.dim() == 2 else 0)


def build(model_type: str, head: str) -> tuple[torch.nn.Module | None, str]:
    """The tiny dense model (seeded, eval mode), or None and why it was not built."""
    try:
        config = tiny_config(model_type, head)
        cls = model_class(model_type, head)
        with torch.device("meta"):
            probe = cls(copy.deepcopy(config))
        count = sum(p.numel() for p in probe.parameters())
        if count > MAX_PARAMETERS:
            return None, f"{count / 1e6:.1f}M parameters with the generic small config"
        longest = max((_row_length(name, p) for name, p in probe.named_parameters() if p.dim() >= 2), default=0)
        if longest > MAX_ROW:
            return None, f"rows of {longest} values with the generic small config (lossless needs <= {MAX_ROW})"
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():
            logits_of(model, inputs_for(config, head))
        with tempfile.TemporaryDirectory() as tmp:  # transformers must be able to save and reload it
            model.save_pretrained(tmp)
            cls.from_pretrained(tmp)
        return model, ""
    except Exception as err:  # noqa: BLE001 - every way of failing to build is reported, not raised
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def run_case(model_type: str, head: str) -> CaseResult:
    cls_name = HEADS[head].get(model_type, "?")
    result = CaseResult(model_type, head, cls_name, "not built")
    dense, why = build(model_type, head)
    if dense is None:
        result.detail = why
        return result
    result.parameters = sum(p.numel() for p in dense.parameters())
    inputs = inputs_for(dense.config, head)
    cls = type(dense)
    stage = "save dense"
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            dense.save_pretrained(f"{tmp}/dense")
            reference = logits_of(dense, inputs)
            stage = "load with dkm_config"
            model = cls.from_pretrained(f"{tmp}/dense", dkm_config=dkm_hf.DKMConfig(**LOSSLESS)).eval()
            stage = "(a) hard logits"
            result.coverage, left = coverage(model)
            hard = logits_of(model, inputs)
            result.errors["hard"] = relative_error(hard, reference)
            stage = "(b) training step"
            result.errors["missing_grads"] = _training_step(copy.deepcopy(model), dense, inputs)
            stage = "(c) palettize, save, reload"
            dkm_hf.palettize(model)
            model.save_pretrained(f"{tmp}/palettized")
            reloaded = cls.from_pretrained(f"{tmp}/palettized").eval()
            if not dkm_hf.palettized_modules(reloaded):
                raise AssertionError("the reloaded checkpoint has no palettized weights")
            result.errors["reloaded"] = relative_error(logits_of(reloaded, inputs), reference)
            stage = "(e) lossy DKM vs palettized"
            lossy = cls.from_pretrained(f"{tmp}/dense", dkm_config=dkm_hf.DKMConfig(**LOSSY)).eval()
            before = logits_of(lossy, inputs)
            after = logits_of(dkm_hf.palettize(lossy), inputs)
            result.errors["lossy_dkm_vs_palettized"] = relative_error(after, before)
    except Exception as err:  # noqa: BLE001
        result.outcome = "error"
        last = traceback.extract_tb(err.__traceback__)[-1]
        message = str(err).splitlines()[0][:200] if str(err) else ""
        result.detail = f"{stage}: {type(err).__name__}: {message} ({last.name})"
        return result
    failed = [
        f"{key} {value:.2g}"
        for key, value in result.errors.items()
        if (key != "missing_grads" and not value <= TOLERANCE) or (key == "missing_grads" and value)
    ]
    if result.coverage < COVERAGE:
        failed.append(f"coverage {result.coverage:.0%} (left out: {', '.join(left[:3])})")
    result.outcome = "fail" if failed else "pass"
    result.detail = "; ".join(failed)
    return result


def _training_step(model: torch.nn.Module, dense: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """One forward and backward in train mode; the number of clustered weights without a finite, non-zero gradient
    whose dense counterpart gets a material one."""
    dense_grads = set()
    with torch.enable_grad():
        reference = copy.deepcopy(dense).train()
        torch.manual_seed(0)  # train-mode randomness (dropout, a router's jitter) the same in both passes
        logits_of(reference, inputs).square().mean().backward()
        # A gradient far below the model's largest can vanish when the train-mode forward moves within the test's
        # tolerance (PhiMoE's sparsemixer gives its router a gradient only through tokens whose second expert is
        # within the jitter threshold): only material gradients are required of the clustered model.
        largest = {n: float(p.grad.abs().max()) for n, p in reference.named_parameters() if p.grad is not None}
        floor = 1e-3 * max(largest.values(), default=0.0)
        dense_grads = {n for n, value in largest.items() if value > floor}
        model.train()
        torch.manual_seed(0)
        loss = logits_of(model, inputs).square().mean()
        if not math.isfinite(loss.item()):
            raise AssertionError(f"training loss {loss.item()}")
        loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    missing = 0
    for _, weight in dkm_hf.dkm_modules(model):
        name = names.get(id(weight.weight))
        grad = weight.weight.grad
        finite = grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.ne(0).any())
        if name in dense_grads and not finite:
            missing += 1
    return missing


def all_cases() -> list[tuple[str, str]]:
    return [(model_type, head) for head, mapping in HEADS.items() for model_type in sorted(mapping)]
