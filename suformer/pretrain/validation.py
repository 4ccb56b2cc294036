"""Held-out validation during pretraining.

The last shard files, the fewest that hold `data.validation_examples` rows, are never trained on; the shards were
shuffled when they were written, so their first `data.validation_examples` rows are a random sample of the
examples (the rest of those files is not used: a few thousand rows of a corpus, so that evaluating costs what
`data.validation_examples` says however large the shards are). Every `train.eval_every` steps
the ranks evaluate them together: the micro-batches are dealt round-robin and every rank runs the same number of
forward passes (a rank with none left repeats one and does not count it), because under ZeRO-3 each forward
gathers the parameters from every rank. In eval mode a forward draws no random numbers, so a resumed run still
replays the same dropout masks.
"""
from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from .batches import collate, step_sums, to_device


def split_validation(files: list[str], rows: list[int], examples: int) -> tuple[list[str], list[str]]:
    """(files to train on, files held out): the held-out ones are the fewest last files holding `examples` rows
    (none when `examples` is 0)."""
    held, count = 0, 0
    while held < examples and count < len(files):
        count += 1
        held += rows[-count]
    return files[: len(files) - count], files[len(files) - count:]


class Validation:
    """One rank's share of the held-out examples, collated once, and their evaluation."""

    def __init__(self, files: list[str], examples: int, fs: pafs.FileSystem, objective: str, micro_batch_size: int,
                 rank: int, world: int):
        rows = [row for path in files for row in pq.read_table(path, filesystem=fs).to_pylist()][:examples]
        batches = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        self.forwards = -(-len(batches) // world)  # the same on every rank
        self.batches = [collate(objective, b) for b in batches[rank::world]]
        self.spare = self.batches[0] if self.batches else collate(objective, batches[0])

    @torch.no_grad()
    def evaluate(self, engine, device: torch.device) -> dict:
        """val/loss (per predicted token) and val/token_accuracy over all ranks' shares."""
        engine.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for i in range(self.forwards):
            counted = i < len(self.batches)
            batch = to_device(self.batches[i] if counted else self.spare, device)
            out = engine(**batch)
            if counted:
                totals += step_sums(out.loss, out.logits, batch)
        dist.all_reduce(totals)
        engine.train()
        loss_sum, correct, predicted = totals.tolist()
        return {"val/loss": loss_sum / max(predicted, 1), "val/token_accuracy": correct / max(predicted, 1)}
