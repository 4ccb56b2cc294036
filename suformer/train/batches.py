"""Rows of a worker's Parquet stream -> padded micro-batches, with an exact position to resume from.

Each worker reads its own shard files in order (see `OrderedShards`), cycling epochs; the position is
(epoch, rows consumed in the epoch), saved in every checkpoint, so a restarted run skips exactly what it had
trained on and sees the same batches again: no example twice, none skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from ..data.objectives import OBJECTIVES


@dataclass
class StreamPosition:
    epoch: int = 0
    rows: int = 0


def collate(objective: str, rows: list[dict]) -> dict:
    """Dynamic padding to the longest row, as the objective lays out its inputs and labels."""
    return OBJECTIVES[objective].collate(rows)


def _rows(shard, block_rows: int = 256):
    """Rows in order, read block-wise with background prefetch (row-at-a-time reads stall the training step)."""
    for block in shard.iter_batches(batch_size=block_rows, batch_format="pyarrow", prefetch_batches=4):
        yield from block.to_pylist()


def micro_batches(shard, objective: str, micro_batch_size: int, max_tokens: Optional[int],
                  position: StreamPosition) -> Iterator[tuple[dict, StreamPosition]]:
    """Endless micro-batches from a Ray Data iterator, starting at `position`; yields (batch, position after it).

    A micro-batch holds `micro_batch_size` rows, fewer when `max_tokens` would be exceeded by the padded size.
    """
    epoch, skip = position.epoch, position.rows
    while True:
        rows, consumed, longest = [], 0, 0
        seen_any = False
        for row in _rows(shard):
            seen_any = True
            consumed += 1
            if consumed <= skip:
                continue
            longest_with = max(longest, int(row["num_tokens"]))
            if rows and max_tokens is not None and longest_with * (len(rows) + 1) > max_tokens:
                yield collate(objective, rows), StreamPosition(epoch, consumed - 1)
                rows, longest_with = [], int(row["num_tokens"])
            rows.append(row)
            longest = longest_with
            if len(rows) == micro_batch_size:
                yield collate(objective, rows), StreamPosition(epoch, consumed)
                rows, longest = [], 0
        if not seen_any:
            raise RuntimeError("this worker's data shard is empty")
        if rows:  # the epoch's last, smaller batch
            yield collate(objective, rows), StreamPosition(epoch, consumed)
        epoch, skip = epoch + 1, 0
