"""`Layout`: geometry of a clustered weight, its config.json record, and the checks on records read from disk."""

from __future__ import annotations

import pytest
import torch

from dkm_hf import PalettizedCheckpointError
from dkm_hf.nn.layout import Layout, layouts_from_records


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
