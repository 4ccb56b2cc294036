"""T5 PEGASUS' pretraining objective (ZhuiyiTechnology/t5-pegasus train.py): pseudo-summaries by greedy LCS.

Examples: input_ids `[CLS] source [SEP]` (<= max_source_len), target_ids `[CLS] summary [SEP]` (<= max_target_len);
the decoder reads target[:-1] and predicts target[1:].

A document is cut into units of about 32 characters (on newlines, then on 。), units are grouped into chunks of
about 768 characters with at least 3 units, and from each chunk the units whose removal keeps the remaining text and
the picked text most alike (character-level longest common subsequence) are moved, one by one, into the summary
until it holds more than 25% of the characters. The rest, in order, is the source.

The published loop recomputes every LCS from scratch with an O(L^2) dynamic programme: O(n^2 L^2) per chunk.
Here each LCS is rapidfuzz's bit-parallel C++ LCSseq (O(L^2 / 64)) over a per-chunk compact alphabet, and the
joined strings are built from prefix/suffix pieces instead of re-joining every unit list. tests/ hold the slow
reference and prove equality; benchmarks/data_pipeline.py times it against the published code.
"""
from __future__ import annotations

import bisect
from typing import Iterator

import pyarrow as pa
from rapidfuzz.distance import LCSseq

from ....padding import IGNORE_INDEX, pad
from .base import Objective


def text_segmentate(text: str, maxlen: int, seps: str = "\n") -> list[str]:
    """bert4keras snippets.text_segmentate: split on seps[0], merge neighbours while they fit in maxlen - 1,
    recurse with the next separator on pieces still too long. Units keep their trailing separator."""
    text = text.strip()
    if not seps or len(text) <= maxlen:
        return [text]
    pieces = text.split(seps[0])
    units, current = [], ""
    for i, piece in enumerate(pieces):
        if current and piece and len(current) + len(piece) > maxlen - 1:
            units.extend(text_segmentate(current, maxlen, seps[1:]))
            current = ""
        current += piece if i + 1 == len(pieces) else piece + seps[0]
    if current:
        units.extend(text_segmentate(current, maxlen, seps[1:]))
    return units


def chunk_units(text: str, unit_chars: int = 32, chunk_chars: int = 768, min_units: int = 3) -> Iterator[list[str]]:
    """t5-pegasus text_process: groups of units of about `chunk_chars` characters, each with >= min_units units."""
    chunk, length = [], 0
    for unit in text_segmentate(text, unit_chars, "\n。"):
        if length + len(unit) > chunk_chars and len(chunk) >= min_units:
            yield chunk
            chunk, length = [], 0
        chunk.append(unit)
        length += len(unit)
    if len(chunk) >= min_units:
        yield chunk


def _prefix_joins(pieces: list[str]) -> list[str]:
    """joins[k] = "".join(pieces[:k]) for k = 0..len(pieces)."""
    joins = [""]
    for piece in pieces:
        joins.append(joins[-1] + piece)
    return joins


def pseudo_summary(units: list[str], summary_rate: float = 0.25) -> tuple[str, str]:
    """(source, summary) of one chunk; the greedy LCS selection of t5-pegasus, computed fast."""
    # LCS lengths do not change under a one-to-one relabelling of characters; relabelling each chunk's few hundred
    # distinct CJK characters to small code points lets rapidfuzz use its array path instead of a hash map (2x).
    alphabet = {ord(ch): code for code, ch in enumerate(dict.fromkeys("".join(units)))}
    coded = [unit.translate(alphabet) for unit in units]
    source_idx = list(range(len(units)))
    target_idx: list[int] = []
    while True:
        source_head = _prefix_joins([coded[j] for j in source_idx])
        target_head = _prefix_joins([coded[j] for j in target_idx])
        source_full, target_full = source_head[-1], target_head[-1]
        best_sim, best_pos = -1, 0
        for pos, i in enumerate(source_idx):
            # Candidate i leaves the source and joins the target at its sorted place: both strings are a
            # prefix + suffix of this round's joins, no per-candidate rebuild of unit lists.
            new_source = source_head[pos] + source_full[len(source_head[pos + 1]):]
            at = bisect.bisect(target_idx, i)
            new_target = target_head[at] + coded[i] + target_full[len(target_head[at]):]
            sim = LCSseq.similarity(new_source, new_target)
            if sim > best_sim:  # first maximum wins, as numpy.argmax
                best_sim, best_pos = sim, pos
        bisect.insort(target_idx, source_idx.pop(best_pos))
        source = "".join(units[j] for j in source_idx)
        target = "".join(units[j] for j in target_idx)
        if len(source_idx) == 1 or len(target) / len(source) > summary_rate:
            break
    if len(source) < len(target):
        source, target = target, source
    return source, target


def _examples(document: str, data, tokenizer) -> list[dict]:
    rows = []
    for units in chunk_units(document, data.unit_chars, data.chunk_chars, data.min_units):
        source, target = pseudo_summary(units, data.summary_rate)
        ids = tokenizer.encode(source, maxlen=data.max_source_len)
        rows.append({"input_ids": ids, "target_ids": tokenizer.encode(target, maxlen=data.max_target_len),
                     "num_tokens": len(ids)})
    return rows


def _collate(rows: list[dict]) -> dict:
    target = pad([r["target_ids"] for r in rows], 0)
    labels = target[:, 1:].masked_fill(target[:, 1:] == 0, IGNORE_INDEX)  # predict y[1:] from y[:-1]
    return {"input_ids": pad([r["input_ids"] for r in rows], 0), "decoder_input_ids": target[:, :-1],
            "labels": labels}


def makes_pseudo_summaries(chunk_chars):
    """A document makes an example when it holds one chunk of at least data.min_units units."""
    return lambda document, data: next(
        chunk_units(document, data.unit_chars, chunk_chars(data), data.min_units), None) is not None


def no_pseudo_summary(data) -> str:
    return (f"a pseudo-summary needs at least data.min_units={data.min_units} units (text cut at newlines and 。 "
            f"into pieces of up to data.unit_chars={data.unit_chars} characters)")


OBJECTIVE = Objective(
    name="pegasus", family="t5_pegasus", pre_tokenize="jieba",
    schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("target_ids", pa.list_(pa.int32())),
                      ("num_tokens", pa.int32())]),
    examples=_examples, makes_examples=makes_pseudo_summaries(lambda data: data.chunk_chars),
    no_example_reason=no_pseudo_summary, collate=_collate, longest=lambda data: data.max_source_len,
    lengths=lambda row: (row["num_tokens"], len(row["target_ids"])),
)
