"""Palettized modules on the native CPU kernels: the decoded weight is the torch decode bit for bit, so dense mode
and large packed inputs give exactly the torch path's outputs; a packed Linear's fused gemv (few rows, float32) equals
the dense-mode output within float32 summation-order tolerance; DKM_HF_NATIVE=0 keeps the torch path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import linear_rounding
from torch import nn

import dkm_hf
from dkm_hf.nn import palettized as palettized_module
from dkm_hf.ops import native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler?)")


def _model(bits=4, scale=False, cluster_dim=1, group_size=None):
    torch.manual_seed(0)
    config = dkm_hf.DKMConfig(
        bits=bits,
        cluster_dim=cluster_dim,
        per_channel_scale=scale,
        granularity="per_grouped_channel" if group_size else "per_tensor",
        group_size=group_size,
        weight_threshold=0,
    )
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 30, bias=False), nn.Embedding(48, 64))
    return dkm_hf.palettize(dkm_hf.prepare(dense, config).eval())


CASES = [(4, False, 1, None), (4, False, 1, 1), (3, True, 1, 6), (8, False, 2, None), (2, True, 2, 2)]


@needs_native
@pytest.mark.parametrize(("bits", "scale", "cluster_dim", "group_size"), CASES)
def test_native_decode_is_the_torch_decode(bits, scale, cluster_dim, group_size):
    model = _model(bits, scale, cluster_dim, group_size)
    for m in (model[0], model[2], model[3]):
        w = m.palettized_weights["weight"]
        assert w._native_palette() is not None
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w.compute_dtype = dtype
            assert torch.equal(w.decode(), w._decode_torch())
        w.compute_dtype = torch.float32
    tokens = torch.tensor([3, 47, 3, 0])
    assert torch.equal(
        model[3].palettized_weights["weight"].decode_rows(tokens),
        model[3].palettized_weights["weight"]._decode_torch()[tokens],
    )


@needs_native
@torch.no_grad()  # inference: a bias that needs its gradient takes F.linear's path
@pytest.mark.parametrize(("bits", "scale", "cluster_dim", "group_size"), CASES)
def test_packed_forward_matches_dense(bits, scale, cluster_dim, group_size):
    model = _model(bits, scale, cluster_dim, group_size)
    head = nn.Sequential(model[0], model[1], model[2])
    big, small = torch.randn(3, 7, 64), torch.randn(1, 5, 64)
    dkm_hf.set_inference_mode(model, "dense")  # palettize() leaves packed mode: the reference is the dense one
    assert model[0].inference_mode == model[2].inference_mode == "dense"
    dense_big, dense_small = head(big), head(small)
    dkm_hf.set_inference_mode(model, "packed")
    assert torch.equal(head(big), dense_big)  # 21 rows: the weight decoded just in time, the module's own forward
    got = head(small)  # 5 rows: the fused gemv, another summation order
    # the first layer's rounding, carried through ReLU and the second layer, plus the second layer's own
    w0, w2 = model[0].weight, model[2].weight
    first = linear_rounding(small, w0, model[0].bias)
    bound = first @ w2.double().abs().T + linear_rounding(torch.relu(model[0](small)), w2)
    assert ((got - dense_small).abs() <= bound).all()
    assert model[0].palettized_weights["weight"].packed_linear(small, model[0].bias) is not None
    assert (
        model[0].palettized_weights["weight"]._dense is None and model[2].palettized_weights["weight"]._dense is None
    )


@needs_native
def test_tied_lm_head_uses_the_embedding_palette():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    cfg = dkm_hf.DKMConfig(
        bits=4,
        granularity="per_grouped_channel",
        group_size=1,
        weight_threshold=0,
        overrides={".*embed_tokens": {"bits": 8, "granularity": "per_tensor", "group_size": None}},
    )
    model = dkm_hf.palettize(dkm_hf.prepare(model, cfg).eval())
    assert model.lm_head.tied_source is model.model.embed_tokens
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        dkm_hf.set_inference_mode(model, "dense")  # palettize() leaves packed mode: the reference is the dense one
        dense = model(ids).logits
        dkm_hf.set_inference_mode(model, "packed")
        assert model.lm_head.palettized_weights["weight"]._native_palette() is not None
        packed = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        dkm_hf.set_inference_mode(model, "dense")
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, expected)


def test_torch_path_when_disabled(monkeypatch):
    model = _model(3, True, 1, 6)
    x = torch.randn(2, 64)
    dkm_hf.set_inference_mode(model, "dense")
    dense = model[0](x)
    monkeypatch.setenv("DKM_HF_NATIVE", "0")
    dkm_hf.set_inference_mode(model, "packed")
    assert (
        model[0].palettized_weights["weight"]._native_palette() is None
        and model[0].palettized_weights["weight"].packed_linear(x, model[0].bias) is None
    )
    assert torch.equal(model[0](x), dense)
    assert torch.equal(model[0].decode(), model[0].palettized_weights["weight"]._decode_torch())
    monkeypatch.delenv("DKM_HF_NATIVE")
    if native.available():  # back on: the cached "no palette" does not stick
        assert model[0].palettized_weights["weight"]._native_palette() is not None
    assert isinstance(palettized_module.GEMV_MAX_ROWS, int)


@pytest.mark.parametrize("mode", ["dense", "packed"])
def test_first_forward_under_inference_mode(mode):
    """Dense mode keeps the weight it decodes on the first forward: a normal tensor even under inference_mode."""
    model = _model()
    x = torch.randn(9, 64)
    expected = model[0](x)
    model = _model()
    dkm_hf.set_inference_mode(model, mode)
    with torch.inference_mode():
        assert torch.equal(model[0](x), expected)
        assert torch.equal(model[0](x), expected)
    assert torch.equal(model[0](x), expected)


def _tiny_palettized_llama(tiny_dir, **config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(weight_threshold=0, **{"bits": 4, **config})
    )
    return dkm_hf.palettize(model)


@torch.no_grad()
def test_autocast_gives_the_autocast_dtype_on_every_path(tiny_dir):
    """Under CPU autocast a palettized Linear returns bfloat16 for a few rows (the LUT gemv's range) as for many, as
    nn.Linear does, so static-cache generation under autocast runs and equals the dequantized model's (before: the
    gemv returned float32 and the static cache refused it)."""
    model = _tiny_palettized_llama(tiny_dir)
    plain = dkm_hf.dequantize(copy.deepcopy(model))
    layer = model.model.layers[0].mlp.up_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for rows in (1, 8, 9):
            assert layer(torch.randn(rows, 32)).dtype == torch.bfloat16
        ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
        options = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static"}
        out = model.generate(ids, **options, output_scores=True, return_dict_in_generate=True)
        ref = plain.generate(ids, **options, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores))


@torch.no_grad()
def test_a_model_palettized_under_inference_mode_runs(tiny_dir):
    """palettize / deepcopy under torch.inference_mode() make inference tensors, which have no version counter: the
    forward runs in both modes, inside and outside inference mode (before: 'Inference tensors do not track version
    counter' on every forward). The palettized buffers are made outside it (a load into them bumps their versions)."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(weight_threshold=0))
    expected = dkm_hf.palettize(copy.deepcopy(model)).eval()(ids).logits
    with torch.inference_mode():
        palettized = dkm_hf.palettize(copy.deepcopy(model)).eval()
        assert not palettized.model.layers[0].mlp.up_proj.weight_lut.is_inference()
        torch.testing.assert_close(palettized(ids).logits, expected)
    for mode in ("packed", "dense"):
        dkm_hf.set_inference_mode(palettized, mode)
        torch.testing.assert_close(palettized(ids).logits, expected)


@torch.no_grad()
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize(
    "shape_bits", [(50, 10, 4, 1), (99, 36, 8, 2), (64, 10, 3, 1), (96, 32, 2, 1, 8), (48, 16, 3, 2, 12)]
)
def test_torch_path_embedding_rows_with_padded_indices_and_bad_ids(monkeypatch, shape_bits, scale):
    """The packed Embedding without the native kernels (GPUs, DKM_HF_NATIVE=0): a weight whose packed indices end
    in padding bytes decodes the looked-up rows (before: a view of the padded buffer failed), and a negative id is an
    IndexError as in nn.Embedding (before: the last row, silently). With per-channel scales, each row's scale; with
    grouped LUTs (the last two shapes: rows of whole bytes, a LUT per group of 8 / 12 tokens), each row's LUT."""
    monkeypatch.setenv("DKM_HF_NATIVE", "0")
    tokens, features, bits, d, *group = shape_bits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(tokens, features))
    grouped = {"granularity": "per_grouped_channel", "group_size": group[0]} if group else {}
    config = dkm_hf.DKMConfig(bits=bits, cluster_dim=d, weight_threshold=0, per_channel_scale=scale, **grouped)
    hard = dkm_hf.prepare(model, config).eval()
    ids = torch.tensor([[1, 2, tokens - 1, 1]])
    expected = hard(ids)
    palettized = dkm_hf.palettize(hard)
    torch.testing.assert_close(palettized(ids), expected, rtol=0, atol=0)
    with pytest.raises(IndexError):
        palettized(torch.tensor([[1, -1]]))
    with pytest.raises(IndexError):
        palettized(torch.tensor([[tokens]]))


def test_palettized_and_dkm_models_run_on_the_meta_device(tiny_dir):
    """On the meta device (shapes only) a packed palettized model and a DKM model in eval run a forward, as the
    plain model does (before: torch.unique / a .item() on meta tensors)."""
    from transformers import AutoModelForCausalLM

    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    for model in (
        _tiny_palettized_llama(tiny_dir),
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dkm_config=dkm_hf.DKMConfig(weight_threshold=0)),
    ):
        with torch.no_grad():
            out = model.eval().to("meta")(ids).logits
        assert out.is_meta and out.shape == (2, 6, 99)


@needs_native
def test_the_lut_gemv_leaves_a_bias_on_another_device_to_f_linear():
    """The few-row LUT gemv handed any bias to the native kernel, which checks its size, not its device: a meta
    bias (a tie transformers had not made) gave values read from no tensor, where nn.Linear raises."""
    torch.manual_seed(0)
    model = dkm_hf.prepare(nn.Sequential(nn.Linear(32, 8)), dkm_hf.DKMConfig(bits=4, weight_threshold=0))
    layer = dkm_hf.palettize(model)[0]
    layer.bias = nn.Parameter(torch.empty(8, device="meta"), requires_grad=False)
    with pytest.raises(RuntimeError, match="meta"):
        layer(torch.randn(1, 32))


@needs_native
def test_a_moved_or_reloaded_model_lets_its_old_buffers_go():
    """The native kernels' view of a weight, kept per weight, holds the buffers it was made from: after a CPU
    forward, `load_state_dict(..., assign=True)` and `model.to(...)` kept every old LUT and index tensor alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    model = dkm_hf.palettize(dkm_hf.prepare(model, dkm_hf.DKMConfig(bits=3, weight_threshold=0))).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = model(x)
        old = weakref.ref(model[0].weight_lut)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        gc.collect()
        assert old() is None and torch.equal(model(x), expected)
        old = weakref.ref(model[0].weight_indices)
        model.to("meta")  # as to another device
        gc.collect()
        assert old() is None
