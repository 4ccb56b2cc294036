"""Exponential moving average of the weights (kexue.fm/archives/6575), with torch's own AveragedModel:
Theta <- decay * Theta + (1 - decay) * theta after every optimizer step, Theta_0 = theta_0 (no bias correction);
evaluate and save `ema.module`. bert4keras' default decay is 0.999."""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .base import Trick, register_trick


def ema_model(model: torch.nn.Module, decay: float = 0.999) -> AveragedModel:
    if not 0 < decay < 1:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)  # AveragedModel's first update copies: make that Theta_0 = theta_0, not theta_1
    return ema


@register_trick
class EMA(Trick):
    """Evaluated and kept: the averaged weights (`tricks.ema_decay`)."""
    name = "ema"

    class Settings(Trick.Settings):
        ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # bert4keras 0.999

    @staticmethod
    def active(tricks):
        return tricks.ema_decay is not None

    def setup(self, model, trainable, task, train):
        self.ema = ema_model(model, self.settings.ema_decay)

    def after_step(self, model):
        self.ema.update_parameters(model)

    def eval_model(self, model):
        return self.ema.module
