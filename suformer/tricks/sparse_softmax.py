"""Sparse softmax (kexue.fm/archives/8046, arXiv 2112.12433): the cross-entropy over the top-k logits only,
logsumexp(top_k(logits)) - logit_target, so training matches top-k / beam decoding. The logits outside the top k
get no gradient: for fine-tuning, not for training from scratch. bojone/SPACES uses k = 10."""
from __future__ import annotations

import torch

from ..models.layers import at_least_fp32


def sparse_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, k: int = 10,
                                 ignore_index: int = -100) -> torch.Tensor:
    logits, labels = at_least_fp32(logits.flatten(0, -2)), labels.flatten()
    keep = labels != ignore_index
    logits, labels = logits[keep], labels[keep]
    target = logits.gather(-1, labels[:, None]).squeeze(-1)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).values
    return (torch.logsumexp(top, dim=-1) - target).mean()
