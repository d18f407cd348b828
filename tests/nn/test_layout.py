"""`Layout`: geometry of a clustered weight, its config.json record, and the checks on records read from disk."""

from __future__ import annotations

import pytest
import torch

from dkm_hf import PalettizedCheckpointError
from dkm_hf.nn.layout import Layout, layouts_from_records, vector_groups


def test_geometry_of_linear_conv_and_transposed():
    linear = Layout.for_weight((48, 64), bits=3, cluster_dim=2, group_size=16)
    assert (linear.channels, linear.features, linear.groups) == (48, 64, 3)
    assert linear.lut_shape == (3, 8, 2) and linear.vectors_per_group == 16 * 64 // 2
    conv = Layout.for_weight((8, 4, 3, 3), bits=2)
    assert (conv.channels, conv.features) == (8, 36)
    gpt2 = Layout.for_weight((32, 96), bits=4, transposed=True, per_channel_scale=True)
    assert (gpt2.channels, gpt2.features, gpt2.scale_shape) == (96, 32, (96, 1))
    weight = torch.randn(32, 96)
    rows = gpt2.to_rows(weight)
    assert rows.shape == (96, 32) and torch.equal(gpt2.from_rows(rows), weight)
    assert torch.equal(gpt2.weight_from_vectors(gpt2.to_vectors(rows)), weight)


def test_geometry_that_does_not_fit_names_the_module():
    with pytest.raises(ValueError, match=r"cluster_dim=3 does not divide the 64 features .* of encoder\.fc"):
        Layout.for_weight((10, 64), bits=2, cluster_dim=3, name="encoder.fc")
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the 10 output channels of encoder\.fc"):
        Layout.for_weight((10, 64), bits=2, group_size=4, name="encoder.fc")


def test_record_round_trip_and_ties():
    layout = Layout.for_weight((48, 64), bits=3, cluster_dim=2, group_size=16, per_channel_scale=True)
    record = layout.to_record()
    assert record == {"bits": 3, "cluster_dim": 2, "groups": 3, "shape": [48, 64], "per_channel_scale": True}
    assert Layout.from_record("m", record) == layout
    layouts = layouts_from_records({"embed": record, "head": {"tied_to": "embed"}})
    assert layouts["head"].tied_to == "embed" and layouts["head"].shape == (48, 64)
    assert layouts["head"].to_record() == {"tied_to": "embed"}


GOOD = {"bits": 3, "cluster_dim": 1, "groups": 1, "shape": [8, 8], "per_channel_scale": False}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"m": [1, 2]}, r"'m' has a malformed record"),
        ({"m": {**GOOD, "bits": 9}}, r"'m' has bits=9, above 8"),
        ({"m": {**GOOD, "bits": True}}, r"'m' needs a positive integer 'bits'"),
        ({"m": {**GOOD, "shape": [8, -1]}}, r"'m' has invalid shape"),
        ({"m": {**GOOD, "groups": 3}}, r"'m' has cluster_dim=1 and groups=3, which do not divide"),
        ({"m": {**GOOD, "per_channel_scale": "no"}}, r"'m' needs a bool 'per_channel_scale'"),
        ({"m": {**GOOD, "extra": 1}}, r"'m' has a malformed record"),
        ({"m": GOOD, "h": {"tied_to": ["m"]}}, r"'h' has a malformed tie record"),
        ({"m": GOOD, "h": {"tied_to": "nope"}}, r"'h' is tied to 'nope', which is not a palettized module"),
        ({"h": {"tied_to": "g"}, "g": {"tied_to": "h"}}, r"is tied to '.', which is not a palettized module"),
        ([GOOD], r"modules must be a dict"),
    ],
)
def test_bad_records_name_the_module(records, message):
    with pytest.raises(PalettizedCheckpointError, match=message):
        layouts_from_records(records)


def test_stacked_experts_stored_inputs_first():
    """Experts stored (experts, in, out) (GPT-OSS, Llama4) are transposed: their channels are each expert's output
    columns, one LUT per output row of an expert with group_size 1; rows round-trip; the record says so, and a
    record of stacked experts without it (written before) reads as stored (experts, out, in), whatever the model."""
    layout = Layout.for_weight((4, 32, 80), 4, 1, 1, transposed=True, channel_dims=2)
    assert (layout.channels, layout.features, layout.groups, layout.stacks) == (320, 32, 320, 4)
    w = torch.randn(4, 32, 80)
    rows = layout.to_rows(w)
    torch.testing.assert_close(rows[80 + 7], w[1, :, 7])  # expert 1's output 7 over its 32 inputs
    torch.testing.assert_close(layout.from_rows(rows), w)
    record = layout.to_record()
    assert record["transposed"] is True and record["channel_dims"] == 2
    assert Layout.from_record("experts", record, transposed=False) == layout
    old = {k: v for k, v in record.items() if k != "transposed"} | {"groups": 128}
    assert not Layout.from_record("experts", old, transposed=True).transposed
    with pytest.raises(PalettizedCheckpointError, match="'transposed'"):
        Layout.from_record("linear", {"bits": 4, "cluster_dim": 1, "groups": 1, "shape": [8, 4],
                                      "per_channel_scale": False, "transposed": True})  # fmt: skip


@torch.no_grad()
def test_gpt_oss_experts_get_one_lut_per_output_row(tmp_path):
    """GPT-OSS applies its experts as x @ W[e] with W stored (experts, in, out): per-row LUTs run along each expert's
    inputs for every output (before: one LUT per input feature), 8-bit per-row clustering leaves the model's output
    as it was, and the palettized checkpoint reloads to the hard model."""
    from transformers import GptOssConfig, GptOssForCausalLM

    import dkm_hf

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    dense = GptOssForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = dense(input_ids=ids).logits
    options = {"granularity": "per_grouped_channel", "group_size": 1, "weight_threshold": 0}
    model = GptOssForCausalLM.from_pretrained(tmp_path / "dense", dkm_config=dkm_hf.DKMConfig(bits=8, **options))
    states = dict(dkm_hf.dkm_modules(model))
    gate_up = states["model.layers.0.mlp.experts.gate_up_proj"].layout
    assert gate_up.transposed and gate_up.shape == (4, 32, 80) and gate_up.groups == 4 * 80
    assert states["model.layers.0.mlp.experts.down_proj"].layout.groups == 4 * 32
    hard = model.eval()(input_ids=ids).logits
    assert (hard - expected).abs().max() <= 0.02 * expected.abs().max()
    dkm_hf.palettize(model).save_pretrained(tmp_path / "palettized")
    reloaded = GptOssForCausalLM.from_pretrained(tmp_path / "palettized")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, hard)
    record = reloaded.config.quantization_config.record.modules["model.layers.0.mlp.experts.gate_up_proj"]
    assert record["transposed"] is True


def test_vector_groups_past_two_to_the_31():
    """The torch decode's LUT group of each vector: counted in int32, stacked experts past 2**31 vectors (DeepSeek-V3's
    256 x 7168 x 2048 down_proj, one LUT per expert) asked for negative LUT rows, then other experts' rows."""
    per_group = 7168 * 2048
    for start in (0, 2**31 - 5, 2**32 + 3):
        got = vector_groups(start, start + 10, per_group, torch.device("cpu"))
        want = torch.arange(start, start + 10, dtype=torch.int64) // per_group
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
