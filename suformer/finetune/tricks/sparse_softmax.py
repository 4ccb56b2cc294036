"""Sparse softmax (kexue.fm/archives/8046, arXiv 2112.12433): the cross-entropy over the top-k logits only,
logsumexp(top_k(logits)) - logit_target, so training matches top-k / beam decoding. The logits outside the top k
get no gradient: for fine-tuning, not for training from scratch. bojone/SPACES uses k = 10."""
from __future__ import annotations

import torch
from pydantic import Field

from ...models.layers import at_least_fp32
from ...padding import IGNORE_INDEX
from .base import Trick, check_seq2seq, register_trick


def sparse_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, k: int = 10,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    logits, labels = at_least_fp32(logits.flatten(0, -2)), labels.flatten()
    keep = labels != ignore_index
    logits, labels = logits[keep], labels[keep]
    target = logits.gather(-1, labels[:, None]).squeeze(-1)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
    return (torch.logsumexp(top, dim=-1) - target).mean()


@register_trick
class SparseSoftmax(Trick):
    name = "sparse_softmax"

    class Settings(Trick.Settings):
        sparse_softmax_k: int = Field(0, ge=0)  # 0 off; bojone/SPACES uses 10 (fine-tuning only)

    @staticmethod
    def active(tricks):
        return tricks.sparse_softmax_k > 0

    @staticmethod
    def check(cfg, task):
        check_seq2seq(cfg, task, "sparse_softmax_k")

    def loss(self, batch, model):
        return lambda: sparse_softmax_cross_entropy(model(**batch).logits, batch["labels"],
                                                    self.settings.sparse_softmax_k)
