"""A worker's shard files -> padded micro-batches, with an exact position to resume from in O(1), and the metric
sums of a micro-batch.

Worker r of W reads shard files r, r + W, r + 2W, ... (the shards were shuffled when they were written) in order,
cycling epochs, straight from Parquet with pyarrow and a background thread reading ahead. The position is
(epoch, file, rows consumed in that file), saved in every checkpoint: a restarted worker opens that file, skips
the row groups before the position from the file's footer and reads on, so a restart costs the same at 90% of an
epoch as at 10%, trains on nothing twice and skips nothing.

A restart with a different number of workers (a node lost and not replaced) deals the rest of every old worker's
epoch, file by file, round-robin to the new workers (`redeal`); each trains on its share, then on its own files
from the next epoch on, so every example is still used once per epoch.

Ray Data's per-worker dataset shards are not used here: a shard iterator can only start at its beginning, so a
resume had to read and convert every row already consumed in the epoch (about 5 minutes per restart at 6 M rows
per rank), and each epoch of a streamed dataset is a new Ray Data execution (5-7 CPU-seconds here).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from itertools import chain, zip_longest
from typing import Iterator, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ..padding import IGNORE_INDEX
from .data.objectives import OBJECTIVES


@dataclass
class StreamPosition:
    epoch: int = 0
    file: int = 0  # index in this epoch's file list: the worker's own files, or `dealt`
    row: int = 0  # rows of that file consumed (counted from its first row)
    # After a change of world size, this epoch's files as [shard index, first row] pairs; None: the worker's own.
    dealt: Optional[list[list[int]]] = None

    def epoch_files(self, shards: list[str], rank: int, world: int, epoch: int) -> list[tuple[str, int]]:
        """(shard file, first row) pairs that `epoch` reads for worker `rank` of `world`."""
        if self.dealt is not None and epoch == self.epoch:
            return [(shards[index], first) for index, first in self.dealt]
        return [(path, 0) for path in shards[rank::world]]

    @classmethod
    def saved(cls, state: dict, files: list[str], fs: pafs.FileSystem) -> "StreamPosition":
        """A position as a checkpoint saved it. Checkpoints written before positions named a file hold (epoch,
        rows consumed in the epoch): translated with the sizes of the worker's files."""
        if "rows" not in state:
            return cls(**state)
        rows = state["rows"]
        for index, path in enumerate(files):
            with fs.open_input_file(path) as f:
                size = pq.ParquetFile(f).metadata.num_rows
            if rows <= size:
                return cls(state["epoch"], index, rows)
            rows -= size
        raise ValueError(f"a saved position of {state['rows']} rows is past the end of {files}")


def collate(objective: str, rows: list[dict]) -> dict:
    """Dynamic padding to the longest row, as the objective lays out its inputs and labels."""
    return OBJECTIVES[objective].collate(rows)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def step_sums(loss: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """[loss x predicted tokens, correctly predicted tokens, predicted tokens, input tokens] of one micro-batch,
    float64 on the device (summed over a logging window, read once).

    A token counts as correct when its label's logit is the row's maximum. That is argmax == label without the
    index search: on CPU a max over the vocabulary costs a fifteenth of an argmax, which was ~4% of a tiny model's
    step. The two differ only when the label ties another token for the maximum exactly.
    """
    labels = batch["labels"]
    predicted = labels != IGNORE_INDEX
    label_logit = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    correct = ((label_logit >= logits.amax(-1)) & predicted).sum()
    inputs = (batch["input_ids"] != 0).sum()
    if "decoder_input_ids" in batch:
        inputs = inputs + (batch["decoder_input_ids"] != 0).sum()
    n = predicted.sum()
    return torch.stack([loss.detach() * n, correct, n, inputs]).double()


def _epoch_groups(files: list[tuple[str, int]], fs: pafs.FileSystem, at: StreamPosition,
                  ) -> Iterator[list[tuple[dict, StreamPosition]]]:
    """One epoch's (file, first row) list from `at`, a row group at a time: [(row, position after it), ...]. Row
    groups before the start are skipped by their sizes in the footer, never read."""
    for index in range(at.file, len(files)):
        path, first = files[index]
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            skip = max(first, at.row if index == at.file else 0)
            done = 0
            for group in range(parquet.metadata.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                if done + size > skip:
                    offset = max(0, skip - done)
                    rows = parquet.read_row_group(group).slice(offset).to_pylist()
                    yield [(row, StreamPosition(at.epoch, index, done + offset + i + 1, at.dealt))
                           for i, row in enumerate(rows)]
                done += size


def _read_ahead(items: Iterator, depth: int = 4) -> Iterator:
    """The same items, produced by a background thread up to `depth` ahead (Parquet decoding releases the GIL),
    so the training step does not wait for the next row group."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def fill():
        try:
            for item in items:
                ready.put(item)
            ready.put(end)
        except BaseException as error:  # raised in the consumer, not lost with the thread
            ready.put(error)

    threading.Thread(target=fill, daemon=True).start()
    while (item := ready.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def micro_batches(shards: list[str], rank: int, world: int, objective: str, micro_batch_size: int,
                  max_tokens: Optional[int], position: StreamPosition, fs: Optional[pafs.FileSystem] = None,
                  ) -> Iterator[tuple[dict, StreamPosition]]:
    """Endless micro-batches for worker `rank` of `world` from `position`; yields (batch, position after it).

    A micro-batch holds `micro_batch_size` rows, fewer when `max_tokens` would be exceeded by the padded size,
    and an epoch's last one may be smaller.
    """
    fs = fs or pafs.LocalFileSystem()
    at = position
    while True:
        rows, longest, seen_any = [], 0, False
        files = position.epoch_files(shards, rank, world, at.epoch)
        for row, after in chain.from_iterable(_read_ahead(_epoch_groups(files, fs, at))):
            seen_any = True
            longest_with = max(longest, int(row["num_tokens"]))
            if rows and max_tokens is not None and longest_with * (len(rows) + 1) > max_tokens:
                yield collate(objective, rows), at
                rows, longest_with = [], int(row["num_tokens"])
            rows.append(row)
            longest, at = longest_with, after
            if len(rows) == micro_batch_size:
                yield collate(objective, rows), at
                rows, longest = [], 0
        if rows:  # the epoch's last, smaller batch
            yield collate(objective, rows), at
        if not seen_any and at.dealt is None and (at.file, at.row) == (0, 0):
            raise RuntimeError(f"this worker's data shards are empty: {shards[rank::world]}")
        at = StreamPosition(at.epoch + 1)  # a dealt share (possibly empty) is read once


def redeal(saved: list[StreamPosition], shards: list[str], rank: int, world: int) -> StreamPosition:
    """Worker `rank`'s position when `world` workers resume from the positions `saved` by len(saved) others: the
    files, or rests of files, the old workers had still to read in their epochs, dealt round-robin. Dealt by file,
    not by row: a worker may read one file more than another for the rest of that epoch."""
    rest = []
    for old_rank, at in enumerate(saved):
        files = at.dealt if at.dealt is not None else [[i, 0] for i in range(old_rank, len(shards), len(saved))]
        rest.append([[index, max(first, at.row) if n == at.file else first]
                     for n, (index, first) in enumerate(files) if n >= at.file])
    interleaved = [piece for pieces in zip_longest(*rest) for piece in pieces if piece is not None]
    return StreamPosition(min(at.epoch for at in saved), 0, 0, interleaved[rank::world])
