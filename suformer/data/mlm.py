"""RoFormerV2 pretraining examples: whole-word masked LM and UniLM seq2seq (roformer-v2 train_mlm.py, bert4keras).

Whole-word masking: the text is cut into words (jieba, where the original used Baidu LAC), each word is encoded on
its own with the char tokenizer, and per word r ~ U(0, 1) decides: r < 0.8p every token -> [MASK];
< 0.9p keep the tokens; < p random ids in [1, V); predicted in all three cases (p = mask_rate, 15%).
"""
from __future__ import annotations

import logging
import random

import jieba

from ..tokenizer import Tokenizer, normalize

IGNORE = -100


def whole_word_mask(text: str, tokenizer: Tokenizer, rng: random.Random, max_len: int = 512,
                    mask_rate: float = 0.15) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) examples `[CLS] tokens [SEP]` covering the whole text: a text longer than `max_len`
    tokens is cut between words into as many examples as it needs (a single word longer than a whole example is
    cut). Labels are -100 where nothing is predicted."""
    jieba.setLogLevel(logging.WARNING)
    room = max_len - 2
    examples, input_ids, labels = [], [], []

    def flush():
        if input_ids:
            examples.append(([tokenizer.cls_id] + input_ids + [tokenizer.sep_id], [IGNORE] + labels + [IGNORE]))
        input_ids.clear()
        labels.clear()

    for word in jieba.cut(normalize(text) if tokenizer.lowercase else text, HMM=False):
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
            labels += [IGNORE] * len(ids)
            continue
        labels += ids
    flush()
    return examples


def unilm_example(source: str, target: str, tokenizer: Tokenizer, max_len: int = 512) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of `[CLS] source [SEP] target [SEP]`; the loss reads target positions."""
    return tokenizer.encode_pair(source, target, maxlen=max_len)


def unilm_labels(input_ids: list[int], token_type_ids: list[int]) -> list[int]:
    """labels[t] = input_ids[t + 1] where position t + 1 is target (segment 1), else -100: logits at t predict
    the next target token, starting from the source's [SEP] (bert4keras CrossEntropy(2))."""
    nxt = input_ids[1:] + [IGNORE]
    seg = token_type_ids[1:] + [0]
    return [tok if s == 1 else IGNORE for tok, s in zip(nxt, seg)]
