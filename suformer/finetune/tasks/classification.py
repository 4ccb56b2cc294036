"""Text classification on RoFormerV2: [CLS] or mean pooling over the final hidden states, dropout, a linear head.

bert4keras' classifiers take the [CLS] vector (`Lambda(lambda x: x[:, 0])`); mean pooling over the real tokens
is the usual alternative for a model without a pooler, as RoFormerV2 has none.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.layers import at_least_fp32
from ...models.outputs import ModelOutput
from ...padding import pad
from .base import Task, read_json_lines, split_off_dev
from .registry import register_task


class SequenceClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, pooling: Literal["cls", "mean"] = "cls",
                 dropout: float = 0.1):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The token-embedding matrix (what FGM, PGD and the gradient penalty perturb)."""
        return self.encoder.get_input_embeddings().weight

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ModelOutput:
        if attention_mask is None:
            attention_mask = input_ids != self.encoder.config.pad_token_id
        hidden = self.encoder.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.pool(hidden, attention_mask)))
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


def classification_metrics(predictions, labels) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro"))}


class ClassificationTask(Task):
    """Single-sentence classification over `self.labels` with a SequenceClassifier; subclasses read the data."""
    metric = "accuracy"
    head_modules = ["classifier"]
    softmax_outputs = True
    labels: tuple[str, ...] = ()

    def texts(self, rows):
        return [text for text, _ in rows]

    def encode(self, rows, tokenizer):
        return [(tokenizer.encode(text, self.cfg.data.max_len), label) for text, label in rows]

    def collate(self, features):
        ids = pad([ids for ids, _ in features])
        return {"input_ids": ids, "attention_mask": ids != 0, "labels": torch.tensor([y for _, y in features])}

    def head(self, encoder, tokenizer):
        m = self.cfg.model
        return SequenceClassifier(encoder, num_labels=len(self.labels), pooling=m.pooling, dropout=m.dropout)

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        predicted, labels = [], []
        for batch in self.batches(features, batch_size):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        return classification_metrics(predicted, labels)


def read_clue_labels(path) -> tuple[str, ...]:
    """The label ids of a CLUE `labels.json` (`{"label": "100", "label_desc": "news_story"}` per line), in file
    order: class i is the i-th line's label."""
    labels = []
    for number, row in read_json_lines(path):
        if "label" not in row:
            raise ValueError(f"{path}:{number}: no 'label' field")
        labels.append(str(row["label"]))
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"{path}: {len(labels)} labels, {len(set(labels))} distinct: expected one line per class")
    return tuple(labels)


def read_clue_classification(path, labels: tuple[str, ...]) -> list[tuple[str, int]]:
    """(sentence, class index) rows of a CLUE TNEWS / IFLYTEK file: JSON lines with `sentence` and `label` (TNEWS'
    `keywords` are not used: Su's classifiers read the sentence alone)."""
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for number, row in read_json_lines(path):
        if "sentence" not in row or "label" not in row:
            raise ValueError(f"{path}:{number}: expected 'sentence' and 'label' fields (CLUE's test.json has no "
                             "labels)")
        label = str(row["label"])
        if label not in index:
            raise ValueError(f"{path}:{number}: label {label!r} is not in labels.json")
        rows.append((row["sentence"], index[label]))
    if not rows:
        raise ValueError(f"{path}: no sentences")
    return rows


@register_task("classification")
class ClueClassificationTask(ClassificationTask):
    """CLUE's TNEWS (15 classes) and IFLYTEK (119): `data.path` holds train.json, dev.json and labels.json. The
    public test set has no labels, so dev.json is the test set (Su's CLUE figures are dev accuracy) and a seeded
    tenth of train.json the dev set that picks the epoch."""
    data_folder = "a CLUE folder (train.json, dev.json, labels.json: TNEWS or IFLYTEK)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.folder = Path(cfg.data.path).expanduser()
        for name in ("train.json", "dev.json", "labels.json"):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"data.path {self.folder}: CLUE's {name} not found")
        self.labels = read_clue_labels(self.folder / "labels.json")

    def splits(self):
        train, dev = split_off_dev(read_clue_classification(self.folder / "train.json", self.labels),
                                   self.cfg.data.split_seed)
        return {"train": train, "dev": dev, "test": read_clue_classification(self.folder / "dev.json", self.labels)}
