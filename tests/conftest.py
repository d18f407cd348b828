from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny tensors: with several threads, thread wake-ups dominate every op on a small shared machine.
torch.set_num_threads(1)

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
)

TINY = {
    "bert": (
        BertForSequenceClassification,
        lambda: BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=3,
        ),
    ),
    "gpt2": (
        GPT2LMHeadModel,
        lambda: GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    ),
    "llama": (
        LlamaForCausalLM,
        lambda: LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
    ),
    "mobilenet_v2": (
        MobileNetV2ForImageClassification,
        lambda: MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=5),
    ),
}


AUTO = {
    "bert": AutoModelForSequenceClassification,
    "gpt2": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "mobilenet_v2": AutoModelForImageClassification,
}


# float32 unit roundoff. Summing n float32 terms in another order moves the sum by at most about (n - 1) * U * sum|x_i|
# (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 4.2): the error scales with the magnitude
# of the summed terms, not with the result, which can be small by cancellation. Runs that differ only in summation
# order (processes, micro-batches, the CPU's vector width: AVX2, AVX-512, AMX) are compared in those units.
U = 2.0**-24


def assert_within(actual, expected, bound: float, scale: float, what: str, rounding: float = 0.0) -> None:
    """max |actual - expected| <= bound * scale + rounding, for tensors whose elements may differ by float reordering
    (`rounding`: what storing the result in its dtype adds, e.g. a weight updated in place rounds to one ulp of
    itself per step, ulp(w) <= 2 U |w|)."""
    diff = (torch.as_tensor(actual) - torch.as_tensor(expected)).abs().max().item()
    limit = bound * scale + rounding
    assert diff <= limit, f"{what}: max |difference| {diff:.3g} > {bound:.3g} x {scale:.3g} + {rounding:.3g}"


def weight_rounding(weight, steps: int) -> float:
    """What `steps` in-place float32 updates of `weight` can differ by from rounding alone: two runs whose updates
    differ by reordering can round each step's result to neighbouring floats, one ulp (<= 2 U |w|) per step."""
    return steps * 2 * U * torch.as_tensor(weight).abs().max().item()


def first_step_change(trainer) -> tuple[torch.Tensor, float]:
    """Train `trainer` (one optimizer step: SGD at lr 1 without clipping) and return every parameter's change, which
    is then minus the gradient, flattened into one tensor, and the logged loss."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, trainer.model.parameters())]), loss


def linear_rounding(x, weight, bias=None):
    """Elementwise bound on how far two float32 evaluations of x W^T + b can differ by summation order alone: each is
    within gamma_n (|x| |W|^T + |b|) of the exact value (n: the products and the bias summed; gamma_n = n U / (1 -
    n U)), so the two within twice that."""
    n = x.shape[-1] + (bias is not None)
    gamma = n * U / (1 - n * U)
    exact = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    return 2 * gamma * exact


def free_port() -> int:
    """A port nothing listens on now, for a torch.distributed.run rendezvous (a fixed one can still be held by the
    previous launch's sockets)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(name: str):
    """The tiny `name` model of TINY, its weights drawn from seed 0."""
    cls, make_config = TINY[name]
    torch.manual_seed(0)
    return cls(make_config())


def save_tiny(name: str, path) -> str:
    tiny_model(name).save_pretrained(path)
    return str(path)


def tiny_inputs(name: str, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "mobilenet_v2":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(1, 99, (batch, 9), generator=g)}


# One 2-bit LUT per output row of every weight, whatever its size: the layout LLMs use, on the tiny models.
PER_ROW_2BIT = {
    "bits": 2,
    "granularity": "per_grouped_channel",
    "group_size": 1,
    "weight_threshold": 0,
    "kmeans_restarts": 2,
}


def tiny_lm_batches(count: int = 3, name: str = "llama") -> list[dict]:
    """`count` language-model batches for the tiny `name` model: tiny_inputs' tokens rolled by 0..count-1, the
    same tokens as labels."""
    out = []
    for i in range(count):
        ids = tiny_inputs(name, batch=2)["input_ids"].roll(i, 1)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.fixture
def tiny_dir(tmp_path):
    return lambda name: save_tiny(name, tmp_path / name)
