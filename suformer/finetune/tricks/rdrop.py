"""R-Drop (kexue.fm/archives/8496): every example twice in the batch, so the two copies see different dropout masks;
cross-entropy on both plus a symmetric KL between their predictions. Su uses alpha 4 and dropout 0.3."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...models.layers import at_least_fp32
from ...padding import IGNORE_INDEX
from .base import Trick, register_trick


def repeat_for_rdrop(batch: dict) -> dict:
    """Each row twice, adjacently (rows 2i and 2i+1 are the same example)."""
    return {k: v.repeat_interleave(2, dim=0) if torch.is_tensor(v) else v for k, v in batch.items()}


def rdrop_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 4.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mean CE over all 2B rows + alpha/4 * mean over pairs of [KL(p1||p2) + KL(p2||p1)], as Su's code (the /4
    matches the paper's CE1 + CE2 + alpha/2 (KL + KL) up to the factor 1/2 of the mean). Logits are [2B, C] or
    [2B, T, C] (per-token KL, averaged over the positions whose label is not `ignore_index`)."""
    logits = at_least_fp32(logits)
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index)
    log_p = F.log_softmax(logits, dim=-1)
    a, b = log_p[0::2], log_p[1::2]
    kl = (a.exp() * (a - b)).sum(-1) + (b.exp() * (b - a)).sum(-1)
    keep = (labels[0::2] != ignore_index).float()
    return ce + alpha / 4 * (kl * keep).sum() / keep.sum().clamp(min=1)


@register_trick
class RDrop(Trick):
    name = "rdrop"

    class Settings(Trick.Settings):
        rdrop_alpha: float = Field(0.0, ge=0)  # 0 off; Su uses 4

    @staticmethod
    def active(tricks):
        return tricks.rdrop_alpha > 0

    @staticmethod
    def check(cfg, task):
        from ..tasks import TASKS

        if not task.softmax_outputs:
            with_softmax = [name for name, t in TASKS.items() if t.softmax_outputs]
            raise ValueError(f"tricks.rdrop_alpha: R-Drop's KL compares softmax outputs, which task "
                             f"{cfg.data.task!r} does not have (use it with {with_softmax})")
        if cfg.tricks.sparse_softmax_k:
            raise ValueError("tricks.sparse_softmax_k and tricks.rdrop_alpha each replace the loss: pick one")

    def setup(self, model, trainable, task, train):
        self.seq2seq = task.seq2seq

    def loss(self, batch, model):
        doubled = repeat_for_rdrop(batch)
        inputs = {k: v for k, v in doubled.items() if k != "labels"}
        if "decoder_input_ids" not in inputs and self.seq2seq:
            inputs["decoder_input_ids"] = model.shift_right(doubled["labels"])
        return lambda: rdrop_loss(model(**inputs).logits, doubled["labels"], self.settings.rdrop_alpha)
