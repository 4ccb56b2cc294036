"""Sentence-pair similarity: CoSENT (kexue.fm/archives/8847) and the Sentence-BERT softmax baseline.

Data in the senteval_cn layout used for ATEC, BQ, LCQMC, PAWSX and STS-B: a folder holding `<name>.train.data`,
`<name>.valid.data` and `<name>.test.data`, each line `text1<TAB>text2<TAB>label` (0/1, or 0-5 for STS-B); or
CLUE's AFQMC folder (`train.json`, `dev.json`: JSON lines `{"sentence1", "sentence2", "label": "0"|"1"}`), whose
test set has no labels: its dev set is the test set, and a seeded tenth of train.json the dev set. The metric is
the Spearman correlation between the cosine of the two sentence vectors and the label.

CoSENT: log(1 + Σ_{label(i) > label(j)} exp(λ(cos_j - cos_i))) with λ = 20: every pair that should be more similar
than another is pushed to be, which is exactly what Spearman rewards. Sentence-BERT trains Dense(2, softmax) over
[u; v; |u - v|] with cross-entropy and still predicts with the cosine (the train/test mismatch CoSENT removes).
sentence-transformers has both losses (CoSENTLoss, SoftmaxLoss), but over its own SentenceTransformer model and
batch format; the two losses are a few lines over our encoder, so they are written here.
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

SPLIT_SUFFIXES = {"train": ".train.data", "dev": ".valid.data", "test": ".test.data"}


def read_pairs(path) -> list[tuple[str, str, float]]:
    """(text1, text2, label) rows of one TSV file; a malformed row is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected text1<TAB>text2<TAB>label, got {len(fields)} fields")
            try:
                label = float(fields[2])
            except ValueError:
                raise ValueError(f"{path}:{number}: label {fields[2]!r} is not a number") from None
            rows.append((fields[0], fields[1], label))
    if not rows:
        raise ValueError(f"{path}: no sentence pairs")
    return rows


def read_clue_pairs(path) -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, label) rows of a CLUE AFQMC file."""
    rows = []
    for number, row in read_json_lines(path):
        try:
            rows.append((row["sentence1"], row["sentence2"], float(row["label"])))
        except KeyError as e:
            raise ValueError(f"{path}:{number}: no {e.args[0]!r} field (AFQMC lines have sentence1, sentence2, "
                             "label; CLUE's test.json has no labels)") from None
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{number}: label {row['label']!r} is not a number") from None
    if not rows:
        raise ValueError(f"{path}: no sentence pairs")
    return rows


def similarity_splits(folder, seed: int = 0) -> dict[str, list[tuple[str, str, float]]]:
    folder = Path(folder).expanduser()
    if (folder / "train.json").is_file():  # CLUE (AFQMC)
        if not (folder / "dev.json").is_file():
            raise FileNotFoundError(f"{folder}: a CLUE folder needs dev.json next to train.json")
        train, dev = split_off_dev(read_clue_pairs(folder / "train.json"), seed)
        return {"train": train, "dev": dev, "test": read_clue_pairs(folder / "dev.json")}
    splits = {}
    for split, suffix in SPLIT_SUFFIXES.items():
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) != 1:
            raise FileNotFoundError(f"{folder}: expected one *{suffix} file (senteval_cn layout) or CLUE's "
                                    f"train.json + dev.json, found {len(found)} *{suffix}")
        splits[split] = read_pairs(found[0])
    return splits


def cosent_loss(cosine: torch.Tensor, labels: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """log(1 + Σ_{labels[i] > labels[j]} exp(scale * (cosine[j] - cosine[i])))."""
    scores = at_least_fp32(cosine) * scale
    differences = scores[None, :] - scores[:, None]  # [i, j] = s_j - s_i
    ordered = labels[:, None] > labels[None, :]
    differences = differences.masked_fill(~ordered, float("-inf"))
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences.flatten()]), dim=0)


class SentencePairModel(nn.Module):
    def __init__(self, encoder: nn.Module, loss: Literal["cosent", "sbert"] = "cosent",
                 pooling: Literal["cls", "mean"] = "cls"):
        super().__init__()
        self.encoder, self.loss_kind, self.pooling = encoder, loss, pooling
        # Sentence-BERT's Dense(2) over [u; v; |u - v|]; CoSENT has no head.
        self.classifier = nn.Linear(3 * encoder.config.hidden_size, 2) if loss == "sbert" else None

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.encoder.config.pad_token_id
        hidden = self.encoder.encode(input_ids, mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, input_ids, pair_input_ids, labels=None) -> ModelOutput:
        u, v = self.embed(input_ids), self.embed(pair_input_ids)
        cosine = F.cosine_similarity(at_least_fp32(u), at_least_fp32(v), dim=-1)
        loss = None
        if labels is not None:
            if self.loss_kind == "cosent":
                loss = cosent_loss(cosine, labels)
            else:
                logits = self.classifier(torch.cat([u, v, (u - v).abs()], dim=-1))
                loss = F.cross_entropy(at_least_fp32(logits), labels.long())
        return ModelOutput(logits=cosine, loss=loss)


def spearman(predicted, labels) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(predicted, labels).statistic)


@register_task("similarity")
class SimilarityTask(Task):
    metric = "spearman"
    data_folder = ("a senteval_cn folder (*.train.data, *.valid.data, *.test.data) or CLUE's AFQMC folder "
                   "(train.json, dev.json)")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.head_modules = ["classifier"] if cfg.model.similarity_loss == "sbert" else []

    def splits(self):
        splits = similarity_splits(self.cfg.data.path, self.cfg.data.split_seed)
        if self.cfg.model.similarity_loss == "sbert":
            for split, rows in splits.items():
                bad = next((i for i, (_, _, y) in enumerate(rows) if y not in (0, 1)), None)
                if bad is not None:
                    raise ValueError(f"{self.cfg.data.path} ({split}, pair {bad + 1}): Sentence-BERT's softmax "
                                     f"needs 0/1 labels, got {rows[bad][2]}; use model.similarity_loss=cosent")
        return splits

    def texts(self, rows):
        return [text for a, b, _ in rows for text in (a, b)]

    def encode(self, rows, tokenizer):
        n = self.cfg.data.max_len
        return [(tokenizer.encode(a, n), tokenizer.encode(b, n), y) for a, b, y in rows]

    def collate(self, features):
        return {"input_ids": pad([f[0] for f in features]), "pair_input_ids": pad([f[1] for f in features]),
                "labels": torch.tensor([f[2] for f in features])}

    def head(self, encoder, tokenizer):
        return SentencePairModel(encoder, self.cfg.model.similarity_loss, self.cfg.model.pooling)

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        cosines, labels = [], []
        for batch in self.batches(features, batch_size):
            cosines += model(input_ids=batch["input_ids"], pair_input_ids=batch["pair_input_ids"]).logits.tolist()
            labels += batch["labels"].tolist()
        return {"spearman": spearman(cosines, labels)}
