"""RoFormerV2's masked language model (roformer-v2 train_mlm.py, bert4keras).

Examples: input_ids masked `[CLS] text [SEP]`, labels the original ids where predicted, -100 elsewhere; a document
longer than max_len becomes several examples, cut between words.

Whole-word masking: the text is cut into words (jieba, where the original used Baidu LAC), each word is encoded on
its own with the char tokenizer, and per word r ~ U(0, 1) decides: r < 0.8p every token -> [MASK];
< 0.9p keep the tokens; < p random ids in [1, V); predicted in all three cases (p = mask_rate, 15%).
"""
from __future__ import annotations

import hashlib
import random

import pyarrow as pa

from ....tokenizer import Tokenizer, jieba_words, normalize
from ....padding import IGNORE_INDEX, pad
from .base import Objective


def whole_word_mask(text: str, tokenizer: Tokenizer, rng: random.Random, max_len: int = 512,
                    mask_rate: float = 0.15) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) examples `[CLS] tokens [SEP]` covering the whole text: a text longer than `max_len`
    tokens is cut between words into as many examples as it needs (a single word longer than a whole example is
    cut). Labels are -100 where nothing is predicted."""
    room = max_len - 2
    examples, input_ids, labels = [], [], []

    def flush():
        if input_ids:
            examples.append(([tokenizer.cls_id] + input_ids + [tokenizer.sep_id], [IGNORE_INDEX] + labels + [IGNORE_INDEX]))
        input_ids.clear()
        labels.clear()

    for word in jieba_words(normalize(text) if tokenizer.lowercase else text):
        ids = tokenizer.encode(word)[1:-1][:room]
        if not ids:
            continue
        if len(input_ids) + len(ids) > room:
            flush()
        r = rng.random()
        if r < mask_rate * 0.8:
            input_ids += [tokenizer.mask_id] * len(ids)
        elif r < mask_rate * 0.9:
            input_ids += ids
        elif r < mask_rate:
            input_ids += [rng.randrange(1, len(tokenizer)) for _ in ids]
        else:
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
            continue
        labels += ids
    flush()
    return examples


def _examples(document: str, data, tokenizer) -> list[dict]:
    # Masking randomness seeded from the document itself: the same examples however Ray splits the corpus.
    seed = int.from_bytes(hashlib.sha256(f"{data.seed}:{document}".encode()).digest()[:8], "little")
    return [{"input_ids": ids, "labels": labels, "num_tokens": len(ids)}
            for ids, labels in whole_word_mask(document, tokenizer, random.Random(seed), data.max_len, data.mask_rate)]


OBJECTIVE = Objective(
    name="mlm", family="roformer_v2", pre_tokenize=None,
    schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("num_tokens", pa.int32())]),
    examples=_examples, makes_examples=lambda document, data: True,
    no_example_reason=lambda data: "every non-empty document makes at least one example",
    collate=lambda rows: {"input_ids": pad([r["input_ids"] for r in rows], 0),
                          "labels": pad([r["labels"] for r in rows], IGNORE_INDEX)},
    longest=lambda data: data.max_len, batching="packed", packs=True,
)
