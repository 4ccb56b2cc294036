"""Learning-rate schedules: a linear warm-up from 0 (bert4keras' piecewise_linear), then constant, linear decay or
cosine decay to a floor. Pretraining and fine-tuning both take theirs from here."""
from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["constant", "linear", "cosine"]


def learning_rate_factor(step: int, warmup: int, total: int, schedule: Schedule, min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at `step` of `total`."""
    if warmup and step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decayed = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decayed


def lr_schedule(optimizer, warmup: int, total: int, schedule: Schedule, min_ratio: float = 0.0):
    """A LambdaLR of `learning_rate_factor` over `optimizer`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup, total, schedule, min_ratio))
