"""The registry of module types: a new type needs one registration, and gets DKM and palettized variants."""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F
from torch import nn

import dkm_hf
from dkm_hf.nn import registry
from dkm_hf.nn.registry import module_type, supported_types


class ScaledLinear(nn.Module):
    """A module type dkm_hf does not know: y = 2 x W^T."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.1)

    def forward(self, x):
        return 2 * F.linear(x, self.weight)


def test_builtin_types_and_subclasses():
    assert set(supported_types()) >= {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding}

    class MyLinear(nn.Linear):
        pass

    assert module_type(MyLinear(2, 2)).base is nn.Linear and module_type(nn.ReLU()) is None


def test_registering_a_new_type_is_all_it_takes():
    assert module_type(ScaledLinear(4, 4)) is None
    dkm_hf.register_module(ScaledLinear)(lambda module, x, weight: 2 * F.linear(x, weight))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(ScaledLinear(64, 32))
        x = torch.randn(3, 64)
        dkm_hf.prepare(model, dkm_hf.DKMConfig(bits=3, weight_threshold=0))
        assert type(model[0]).__name__ == "DKMScaledLinear" and isinstance(model[0], ScaledLinear)
        hard = model.eval()(x)
        torch.testing.assert_close(hard, 2 * F.linear(x, model[0].hard_weight()))
        dkm_hf.palettize(model)
        assert type(model[0]).__name__ == "PalettizedScaledLinear"
        assert torch.equal(model(x), hard)
        restored = pickle.loads(pickle.dumps(copy.deepcopy(model)))  # generated classes pickle by name
        assert torch.equal(restored(x), hard)
        dkm_hf.dequantize(model)
        assert type(model[0]) is ScaledLinear and torch.equal(model(x), hard)
    finally:
        registry._REGISTRY.pop(ScaledLinear)
