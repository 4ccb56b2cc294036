"""What a forward pass computes, counted from a batch's shapes: the pieces the families' FLOPs formulas share
(each model's `forward_flops`).

Conventions, as torchtitan and Composer count: 2 FLOPs per multiply-add of a matmul; embedding lookups, norms,
activations and the softmax are not counted; the attention score and value products are (2 x 2 x inner width per
query-key pair), causal masks not halved; recomputation (activation checkpointing) is not counted. A training step
is 3 forward passes (the backward pass computes two matmuls for each of the forward's).

`count="real"` counts what the batch holds: its non-pad tokens, and for attention the keys a query may see in its
own sequence or packed document; `count="computed"` counts what its padded shapes make a dense implementation do
(what torch.utils.flop_counter.FlopCounterMode measures). Their ratio is the share of the work that was useful.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

Count = Literal["real", "computed"]


def matmul(tokens: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of projecting `tokens` vectors of width fan_in to fan_out."""
    return 2 * tokens * fan_in * fan_out


def tokens(mask: torch.Tensor, count: Count) -> int:
    """Tokens of a [B, L] mask of real positions: the real ones, or every position."""
    return mask.numel() if count == "computed" else int(mask.sum())


def attention_pairs(query_mask: torch.Tensor, key_mask: torch.Tensor, count: Count,
                    documents: Optional[torch.Tensor] = None) -> int:
    """Query-key pairs an attention layer scores: every [Lq, Lk] entry of every row, or per row its real queries
    times its real keys; with `documents` ([B, L] ids of packed documents, 0 for padding, self-attention), the
    pairs within each document."""
    if count == "computed":
        return query_mask.shape[0] * query_mask.shape[1] * key_mask.shape[1]
    if documents is None:
        return int((query_mask.sum(1) * key_mask.sum(1)).sum())
    documents = documents.long()
    per_row = int(documents.max()) + 1
    keys = documents + per_row * torch.arange(documents.shape[0], device=documents.device)[:, None]
    sizes = torch.bincount(keys[documents > 0].flatten())
    return int(sizes.square().sum())
