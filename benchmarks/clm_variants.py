"""The causal-LM example with a variant of GPTQ's snapping that dkm_hf does not ship, for the measurements in
benchmarks/RESULTS.md ("Where the gap to the control is, token by token").

    python benchmarks/clm_variants.py sequential-gptq --bits 4 --control false [example arguments]

`sequential-gptq`: block-sequential GPTQ, as in GPTQ's reference code: the calibration batches' inputs to the first
decoder layer are caught once, then each decoder layer in turn gets its Gram matrices from inputs computed by the
layers before it already snapped, is snapped, and computes the next layer's inputs. For decoder LLMs whose layers
sit in `model.model.layers` and take the same keyword arguments each (Llama and its kind); measured, not adopted.
Everything after the variant's name goes to examples/causal_lm/run_clm_dkm.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dkm_hf
from dkm_hf.surgery.gptq import _first_tensor, _value_sets, snap_rows

ROOT = Path(__file__).resolve().parent.parent


class _Caught(Exception):
    pass


@torch.no_grad()
def gptq_snap_sequential(model, batches, damp=0.01, block_size=128, act_order=False, **_unused) -> dict:
    states = dict(dkm_hf.dkm_modules(model))
    layers = model.model.layers
    flags = [(state, state.dkm_enabled) for state in states.values()]
    training = model.training
    for state, _ in flags:
        state.dkm_enabled = False  # the weights as they are: dense, then snapped layer by layer
        state.forget()
    model.eval()
    caught = []

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
    inputs, kwargs = [h for h, _ in caught], [k for _, k in caught]
    for layer in layers:
        inside = {id(m) for m in layer.modules()}
        todo = [(name, state) for name, state in states.items() if id(state.module) in inside]
        grams, products = {}, {}

        def hook_for(name):
            def hook(module, args, kw):
                x = _first_tensor(args, kw)
                seen = products.get(id(x))
                if seen is None or seen[0] is not x:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    seen = products[id(x)] = (x, flat.t() @ flat)
                grams[name] = grams[name] + seen[1] if name in grams else seen[1].clone()

            return hook

        handles = [state.module.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, state in todo]
        try:
            for x, kw in zip(inputs, kwargs):
                products.clear()
                layer(x, **kw)
        finally:
            products.clear()
            for handle in handles:
                handle.remove()
        for name, state in todo:
            rows, values = state.layout.to_rows(state.weight.detach()).float(), _value_sets(state)
            indices = snap_rows(rows, values, grams.pop(name), damp, block_size, act_order)
            state.weight.data.copy_(state.layout.from_rows(values.gather(1, indices)).to(state.weight.dtype))
        outputs = [layer(x, **kw) for x, kw in zip(inputs, kwargs)]
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    for state, enabled in flags:
        state.dkm_enabled = enabled
        state.forget()
    model.train(training)
    return {}


VARIANTS = {"sequential-gptq": gptq_snap_sequential}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python benchmarks/clm_variants.py {{{','.join(VARIANTS)}}} [example arguments]")
    dkm_hf.gptq_snap = VARIANTS[sys.argv[1]]  # the example calls dkm_hf.gptq_snap
    sys.path.insert(0, str(ROOT / "examples"))
    from causal_lm.run_clm_dkm import main as example

    example(sys.argv[2:])


if __name__ == "__main__":
    main()
