"""RoFormerV2's UniLM seq2seq objective (bert4keras): the pseudo-summaries of T5 PEGASUS, as one sequence.

Examples: input_ids `[CLS] source [SEP] summary [SEP]` (<= max_len), token_type_ids 0 on the source, 1 on the
summary; the loss predicts each summary token from the ones before it (a UniLM attention mask). Chunks are sized
to max_len (char tokens: about one per character), so few examples lose text to truncation: 1 in 666 at max_len
512 on People's Daily articles; a chunk still overflows when its data.min_units units are long.
"""
from __future__ import annotations

import pyarrow as pa

from ....padding import IGNORE_INDEX, pad
from .base import Objective
from .pegasus import chunk_units, makes_pseudo_summaries, no_pseudo_summary, pseudo_summary


def unilm_labels(input_ids: list[int], token_type_ids: list[int]) -> list[int]:
    """labels[t] = input_ids[t + 1] where position t + 1 is target (segment 1), else -100: logits at t predict
    the next target token, starting from the source's [SEP] (bert4keras CrossEntropy(2))."""
    nxt = input_ids[1:] + [IGNORE_INDEX]
    seg = token_type_ids[1:] + [0]
    return [tok if s == 1 else IGNORE_INDEX for tok, s in zip(nxt, seg)]


def _chunk_chars(data) -> int:
    return max(data.unit_chars * data.min_units, min(data.chunk_chars, data.max_len - 3))


def _examples(document: str, data, tokenizer) -> list[dict]:
    rows = []
    for units in chunk_units(document, data.unit_chars, _chunk_chars(data), data.min_units):
        # [CLS] source [SEP] summary [SEP] with segments 0 / 1: the loss reads the summary's positions
        ids, segments = tokenizer.encode_pair(*pseudo_summary(units, data.summary_rate), maxlen=data.max_len)
        rows.append({"input_ids": ids, "token_type_ids": segments, "num_tokens": len(ids)})
    return rows


def _collate(rows: list[dict]) -> dict:
    labels = pad([unilm_labels(list(r["input_ids"]), list(r["token_type_ids"])) for r in rows], IGNORE_INDEX)
    return {"input_ids": pad([r["input_ids"] for r in rows], 0),
            "token_type_ids": pad([r["token_type_ids"] for r in rows], 0), "labels": labels, "unilm": True}


OBJECTIVE = Objective(
    name="unilm", family="roformer_v2", pre_tokenize=None,
    schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                      ("num_tokens", pa.int32())]),
    examples=_examples, makes_examples=makes_pseudo_summaries(_chunk_chars), no_example_reason=no_pseudo_summary,
    collate=_collate, longest=lambda data: data.max_len, packs=True,
)
