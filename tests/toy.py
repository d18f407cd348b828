"""A tiny learnable sequence-classification task and model, shared by the trainer tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification


class ToyDataset(torch.utils.data.Dataset):
    """Label = 1 if the first token is in the upper half of the vocabulary."""

    def __init__(self, n: int, seed: int = 0, length: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, 99, (n, length), generator=g)
        self.labels = (self.ids[:, 0] >= 55).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def save_toy_bert(path) -> str:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}
