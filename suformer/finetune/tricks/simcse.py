"""Unsupervised SimCSE (kexue.fm/archives/8348, Su's Chinese evaluation): each sentence passes the encoder twice,
and the two dropout masks make two views; each view must pick its twin out of the batch by cosine similarity
(cross-entropy over the similarities x 20, i.e. temperature 0.05, self-similarity excluded). No labels are used:
the sentences alone train the encoder. Su uses dropout 0.3 (the default 0.1 is weaker on Chinese tasks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...models.layers import at_least_fp32
from .base import Trick, register_trick


def simcse_loss(embeddings: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """`embeddings` [2B, H], rows 2i and 2i+1 the two views of sentence i (as `repeat_interleave(2)` makes them)."""
    z = F.normalize(at_least_fp32(embeddings), dim=-1)
    similarities = z @ z.T * scale
    similarities = similarities.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    twins = torch.arange(len(z), device=z.device) ^ 1  # 0<->1, 2<->3, ...
    return F.cross_entropy(similarities, twins)


@register_trick
class SimCSE(Trick):
    name = "simcse"

    class Settings(Trick.Settings):
        simcse: bool = False  # unsupervised SimCSE on the sentences instead of the labelled pair loss

    @staticmethod
    def active(tricks):
        return tricks.simcse

    @staticmethod
    def check(cfg, task):
        if task.name != "similarity":
            raise ValueError(f"tricks.simcse trains sentence embeddings: use it with data.task=similarity, "
                             f"not {cfg.data.task!r}")

    def loss(self, batch, model):  # both sides of each pair as unlabelled sentences, each twice (two dropout masks)
        return lambda: (simcse_loss(model.embed(batch["input_ids"].repeat_interleave(2, 0)))
                        + simcse_loss(model.embed(batch["pair_input_ids"].repeat_interleave(2, 0)))) / 2
