"""Rows of token ids padded into one tensor, and the label of a position that no loss reads.

Shared by the pretraining objectives (which run in Ray Data workers: torch is imported only when a batch is
padded), the fine-tuning tasks, the models' losses and the tricks that read labels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # PyTorch cross-entropy's default ignore_index: padding, and positions nothing predicts


def pad(rows: Sequence[Sequence[int]], value: int = 0) -> "torch.Tensor":
    """A right-padded [len(rows), longest] long tensor."""
    import torch

    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out
