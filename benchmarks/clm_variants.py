"""The causal-LM example with a variant of GPTQ's snapping that dkm_hf does not ship, for the measurements in
benchmarks/RESULTS.md ("Where the gap to the control is, token by token").

    python benchmarks/clm_variants.py sequential-gptq --bits 4 --control false [example arguments]

`sequential-gptq`: block-sequential GPTQ, as in GPTQ's reference code: the calibration batches' inputs to the first
decoder layer are caught once, then each decoder layer in turn gets its Gram matrices from inputs computed by the
layers before it already snapped, is snapped, and computes the next layer's inputs. For decoder LLMs whose layers
sit in `model.model.layers` and take the same keyword arguments each (Llama and its kind); measured, not adopted.
`true-fisher`: the importance (`gradient_importance`) with every token's label drawn from the dense model's own
next-token distribution instead of the text's next token.
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


VARIANTS = {"sequential-gptq": gptq_snap_sequential, "true-fisher": true_fisher_importance}
PATCHED = {"sequential-gptq": "gptq_snap", "true-fisher": "gradient_importance"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python benchmarks/clm_variants.py {{{','.join(VARIANTS)}}} [example arguments]")
    setattr(dkm_hf, PATCHED[sys.argv[1]], VARIANTS[sys.argv[1]])  # the example calls dkm_hf.<name>
    sys.path.insert(0, str(ROOT / "examples"))
    from causal_lm.run_clm_dkm import main as example

    example(sys.argv[2:])


if __name__ == "__main__":
    main()
