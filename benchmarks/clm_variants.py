"""The causal-LM example with a variant of GPTQ's snapping that dkm_hf does not ship, for the measurements in
benchmarks/RESULTS.md ("Where the gap to the control is, token by token").

    python benchmarks/clm_variants.py sequential-gptq --bits 4 --control false [example arguments]

`sequential-gptq`: block-sequential GPTQ, as in GPTQ's reference code: the calibration batches' inputs to the first
decoder layer are caught once, then each decoder layer in turn gets its Gram matrices from inputs computed by the
layers before it already snapped, is snapped, and computes the next layer's inputs. For decoder LLMs whose layers
sit in `model.model.layers` and take the same keyword arguments each (Llama and its kind); measured, not adopted.
`embedding-widths`: `allocate_bits` with the tied embedding (8 bits per tensor in the recipe) among the weights
whose widths it chooses (4-8 bits per tensor for it, the recipe's choices for the per-row Linears), within the bytes
of the recipe's widths for all of them.
`true-fisher`: the importance (`gradient_importance`) with every token's label drawn from the dense model's own
next-token distribution instead of the text's next token.
`tempered-importance:floor=F,power=P`: the importance (`gradient_importance`) tempered before it weighs anything (the
k-means, the widths, the DKM loop): each weight's f ** P plus F times its row's mean of that (dkm_hf's own: P 1, a
floor of 1e-3 in `ops.kmeans.sample_weights`).
`frozen-embedding`: every row (the control and DKM alike) trains with the (tied) token embedding frozen: a weight
whose name holds `embed_tokens` keeps the values it starts the phase with (DKM: its snapped 8-bit centroids).
Everything after the variant's name goes to examples/causal_lm/run_clm_dkm.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dkm_hf

ROOT = Path(__file__).resolve().parent.parent


class _Caught(Exception):
    pass


@torch.no_grad()
def gptq_snap_sequential(model, batches, damp=0.01, block_size=128, act_order=False, **_unused) -> dict:
    """`dkm_hf.gptq_snap` on one decoder layer at a time, each fed what the layers before it (snapped) give."""
    states = [state for _, state in dkm_hf.dkm_modules(model)]
    flags = [(state, state.dkm_enabled) for state in states]
    training = model.training
    for state in states:
        state.dkm_enabled = False  # the weights as they are: dense, then snapped layer by layer
        state.forget()
    model.eval()
    layers, caught = model.model.layers, []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, dict(kwargs)))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()

    def run(layer, batch):
        out = layer(batch[0], **batch[1])
        return out[0] if isinstance(out, tuple) else out

    for layer in layers:
        # gptq_snap restores the flags it found (off): the snapped weights compute the next layer's inputs
        dkm_hf.gptq_snap(layer, caught, forward=run, damp=damp, block_size=block_size, act_order=act_order)
        caught = [(run(layer, batch), batch[1]) for batch in caught]
    for state, enabled in flags:
        state.dkm_enabled = enabled
        state.forget()
    model.train(training)
    return {}


_gradient_importance = dkm_hf.gradient_importance


def true_fisher_importance(model, batches, loss_fn=None):
    """`dkm_hf.gradient_importance` with each token's label drawn from the dense model's own next-token distribution
    (the Fisher information of the model's predictions, not of the calibration text's labels; one draw per token,
    seeded)."""
    generator = torch.Generator().manual_seed(0)

    def sampled_loss(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        with torch.no_grad():
            probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1)
            labels = torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)

    return _gradient_importance(model, batches, loss_fn=sampled_loss)


def tempered_importance(floor: float = 0.0, power: float = 1.0):
    """`dkm_hf.gradient_importance` whose result is f ** power + floor * (its row's mean of f ** power)."""

    def importance(model, batches, loss_fn=None):
        out = {}
        for name, f in _gradient_importance(model, batches, loss_fn=loss_fn).items():
            f = f.clamp_min(0).pow(power)
            out[name] = f + floor * f.mean(-1, keepdim=True)
        return out

    return importance


def frozen_embedding_train():
    """`Trainer.train` that first freezes every parameter whose name holds `embed_tokens`."""
    import transformers

    train = transformers.Trainer.train

    def patched(self, *args, **kwargs):
        frozen = {n: p for n, p in self.model.named_parameters() if "embed_tokens" in n and p.requires_grad}
        for p in frozen.values():
            p.requires_grad_(False)
        print("frozen-embedding:", list(frozen), flush=True)
        return train(self, *args, **kwargs)

    transformers.Trainer.train = patched


EMBEDDING_CHOICES = (4, 5, 6, 7, 8)


def allocate_bits_with_embedding(model, importance, choices, budget_bits=None, restarts=None):
    """`dkm_hf.allocate_bits` with the embedding (its width set by an override) choosing from EMBEDDING_CHOICES
    too, the budget the bytes of every weight at the width it has (the recipe's size)."""
    import copy

    from dkm_hf.surgery import allocation
    from dkm_hf.surgery.model import get_dkm_config

    config, states = get_dkm_config(model), dict(dkm_hf.dkm_modules(model))
    free = {name: (states[name], f) for name, f in importance.items() if states[name].tied_source is None}
    embedding = {name for name in free if name.endswith("embed_tokens")}
    errors = allocation.sensitivities({n: free[n] for n in embedding}, list(EMBEDDING_CHOICES), restarts)
    errors |= allocation.sensitivities({n: v for n, v in free.items() if n not in embedding}, list(choices), restarts)
    sizes = {name: {b: allocation._bytes(state, b) for b in errors[name]} for name, (state, _) in free.items()}
    budget = sum(allocation._bytes(state, state.layout.bits) for state, _ in free.values())
    widths = allocation._spend(errors, sizes, budget, allocation._search(errors, sizes, budget))
    print("embedding-widths:", {n: widths[n] for n in embedding}, flush=True)
    result = copy.deepcopy(config)
    result.overrides = dict(config.overrides)
    for name, bits in widths.items():
        if name in embedding:
            key = next(p for p in result.overrides if "embed_tokens" in p)
            result.overrides[key] = {**result.overrides[key], "bits": bits}
        elif bits != states[name].layout.bits:
            pattern = allocation._exact(name, states)
            result.overrides[pattern] = {**config.overrides.get(pattern, {}), "bits": bits}
    result.post_init()
    return result


VARIANTS = {
    "sequential-gptq": gptq_snap_sequential,
    "true-fisher": true_fisher_importance,
    "embedding-widths": allocate_bits_with_embedding,
}
PATCHED = {"sequential-gptq": "gptq_snap", "true-fisher": "gradient_importance", "embedding-widths": "allocate_bits"}


def main() -> None:
    name, _, params = sys.argv[1].partition(":") if len(sys.argv) > 1 else ("", "", "")
    if name == "frozen-embedding":
        frozen_embedding_train()
    elif name == "tempered-importance":
        floor_power = {k: float(v) for k, v in (p.split("=") for p in params.split(",") if p)}
        dkm_hf.gradient_importance = tempered_importance(**floor_power)
    elif name in VARIANTS:
        setattr(dkm_hf, PATCHED[name], VARIANTS[name])  # the example calls dkm_hf.<name>
    else:
        names = ",".join([*VARIANTS, "tempered-importance:floor=F,power=P", "frozen-embedding"])
        sys.exit(f"usage: python benchmarks/clm_variants.py {{{names}}} [example arguments]")
    sys.path.insert(0, str(ROOT / "examples"))
    from causal_lm.run_clm_dkm import main as example

    example(sys.argv[2:])


if __name__ == "__main__":
    main()
