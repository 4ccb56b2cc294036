"""ChildTuning (arXiv 2109.05687; Su's analysis kexue.fm/archives/8764): update only a "child network".

- F (task-free): every step each gradient entry is kept with probability p and scaled by 1/p (gradient dropout).
  Under Adam this acts like a learning rate scaled by sqrt(p) over the long run, so a sweep should include that
  control arm (the learning rate times sqrt(p), without the mask).
- D (task-dependent): one pass over the training set estimates the Fisher information F_i = mean (d log p(y|x) /
  d theta_i)^2 of the encoder-block parameters; the entries above the (1 - p) quantile form a fixed mask. As in the
  official code the masked gradient is not divided by p (Su's post writes g * M / p).
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
from pydantic import Field

from .base import Trick, register_trick


class ChildTuningF:
    def __init__(self, params: Iterable[torch.Tensor], reserve_p: float, generator: torch.Generator | None = None):
        if not 0 < reserve_p <= 1:
            raise ValueError(f"reserve_p must be in (0, 1], got {reserve_p}")
        self.params, self.reserve_p, self.generator = list(params), reserve_p, generator

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for p in self.params:
            if p.grad is not None:
                keep = torch.rand(p.grad.shape, generator=self.generator, device=p.grad.device) < self.reserve_p
                p.grad.mul_(keep / self.reserve_p)


class ChildTuningD:
    def __init__(self, masks: dict[str, torch.Tensor], named_params: dict[str, torch.Tensor]):
        self.masks, self.named_params = masks, named_params

    @classmethod
    def from_fisher(cls, model: torch.nn.Module, batch_losses: Callable[[], Iterable[torch.Tensor]],
                    reserve_p: float, selects: Callable[[str], bool] = lambda n: "layers." in n or "blocks." in n,
                    max_grad_norm: float = 1.0) -> "ChildTuningD":
        """Fisher information from `batch_losses()` (the training set's per-batch losses, log-likelihoods of the
        true labels); each parameter's gradient is clipped to `max_grad_norm` first, as the official code."""
        named = {n: p for n, p in model.named_parameters() if p.requires_grad and selects(n)}
        fisher = {n: torch.zeros_like(p) for n, p in named.items()}
        batches = 0
        for loss in batch_losses():
            model.zero_grad(set_to_none=True)
            loss.backward()
            for n, p in named.items():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
                    fisher[n] += p.grad.detach().pow(2)
            batches += 1
        model.zero_grad(set_to_none=True)
        if not batches:
            raise ValueError("ChildTuning-D needs at least one training batch to estimate the Fisher information")
        fisher = {n: f / batches for n, f in fisher.items()}
        values = torch.cat([f.flatten() for f in fisher.values()])
        # The (1 - p) quantile over all selected entries; kthvalue has no size limit (torch.quantile has 2^24).
        threshold = values.kthvalue(max(1, round(values.numel() * (1 - reserve_p)))).values
        return cls({n: f >= threshold for n, f in fisher.items()}, named)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, mask in self.masks.items():
            grad = self.named_params[name].grad
            if grad is not None:
                grad.mul_(mask)


@register_trick
class ChildTuning(Trick):
    name = "child_tuning"

    class Settings(Trick.Settings):
        child_tuning: Literal["none", "F", "D"] = "none"
        child_tuning_p: float = Field(0.3, gt=0, le=1)

    @staticmethod
    def active(tricks):
        return tricks.child_tuning != "none"

    @staticmethod
    def check(cfg, task):
        zero = cfg.train.zero_stage
        if zero:
            raise ValueError(f"tricks.child_tuning masks gradients after backward; ZeRO-{zero} has already reduced "
                             "them into its partitions by then: use train.zero_stage 0 or unset")

    def setup(self, model, trainable, task, train):
        p, batch_size = self.settings.child_tuning_p, self.cfg.train.batch_size
        if self.settings.child_tuning == "F":
            self.child = ChildTuningF(trainable, p)
        else:  # one pass over the training set first, counted in the first epoch's time
            self.child = ChildTuningD.from_fisher(
                model, lambda: (model(**b).loss for b in task.batches(train, batch_size)), p)

    def after_backward(self):
        self.child.mask_gradients()
