"""Adversarial training on the token-embedding matrix: FGM, PGD, and the gradient penalty (kexue.fm/archives/7234).

FGM and PGD follow bert4torch: the clean and the adversarial gradients are accumulated (two or more backward
passes per step) and the embedding matrix is restored before the optimizer step. bert4keras keeps only the
adversarial gradient; with the clean one kept, epsilon -> 0 recovers plain training. The matrix is restored from a
copy, not by subtracting the perturbation, so it comes back bit for bit.

With `one_backward=True` the directions come from `torch.autograd.grad` (no parameter gradients touched) and a
single backward of clean + adversarial loss at the end leaves the same gradients. That is the form a DeepSpeed
ZeRO engine can run: ZeRO-1/2 reduce gradients inside backward and treat every backward as a step boundary, so a
second backward per step would discard the first. It costs one extra backward pass to the embedding.

No library implements these for text embeddings (torchattacks and advertorch attack images, textattack swaps words).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field

from .base import Trick, register_trick

LossFn = Callable[[], torch.Tensor]


def _unit(grad: torch.Tensor) -> torch.Tensor | None:
    norm = grad.norm()
    if norm == 0 or not torch.isfinite(norm):
        return None
    return grad / norm


def _embedding_grad(loss: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, embedding, retain_graph=True)
    return grad


def fgm_backward(compute_loss: LossFn, embedding: torch.Tensor, epsilon: float = 1.0,
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                 one_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean backward, then E += epsilon * g / ||g||, adversarial backward, E restored. Returns both losses.

    `backward` lets a DeepSpeed engine's backward stand in for loss.backward()."""
    loss = compute_loss()
    if one_backward:
        direction = _unit(_embedding_grad(loss, embedding))
    else:
        backward(loss)
        direction = _unit(embedding.grad)
    if direction is None:  # nothing to perturb along: the adversarial loss is the clean one
        if one_backward:
            backward(loss)
        return loss, loss.detach()
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding.add_(epsilon * direction)
    adversarial = compute_loss()
    with torch.no_grad():  # the adversarial graph holds its own copy of the perturbed rows it gathered
        embedding.copy_(saved)
    backward(loss + adversarial if one_backward else adversarial)
    return loss, adversarial


@torch.no_grad()
def _ascend_in_ball(embedding, saved, direction, alpha: float, epsilon: float) -> None:
    """One ascent step of size alpha, projected back into the Frobenius ball of radius epsilon around `saved`."""
    delta = embedding + alpha * direction - saved
    norm = delta.norm()
    if norm > epsilon:
        delta *= epsilon / norm
    embedding.copy_(saved + delta)


def pgd_backward(compute_loss: LossFn, embedding: torch.Tensor, params: list[torch.Tensor], epsilon: float = 1.0,
                 alpha: float = 0.3, steps: int = 3,
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                 one_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient descent (bert4torch defaults K=3, alpha=0.3, epsilon=1): `steps` ascent steps of size
    alpha along the normalised gradient, each projected back into the Frobenius ball of radius epsilon around the
    clean embedding. Intermediate gradients are discarded; the clean gradient plus the last step's adversarial
    gradient remain in `params`' .grad. Returns (clean loss, last adversarial loss)."""
    if one_backward:
        return _pgd_one_backward(compute_loss, embedding, epsilon, alpha, steps, backward)
    loss = compute_loss()
    backward(loss)
    clean_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved = embedding.detach().clone()
    adversarial = loss.detach()
    for step in range(steps):
        direction = _unit(embedding.grad)
        if direction is None:
            break
        _ascend_in_ball(embedding, saved, direction, alpha, epsilon)
        if step < steps - 1:
            for p in params:
                p.grad = None
        else:
            for p, g in zip(params, clean_grads):
                p.grad = g
        adversarial = compute_loss()
        backward(adversarial)
    with torch.no_grad():
        embedding.copy_(saved)
    return loss, adversarial


def _pgd_one_backward(compute_loss, embedding, epsilon, alpha, steps, backward):
    loss = compute_loss()
    grad = _embedding_grad(loss, embedding)
    saved = embedding.detach().clone()
    adversarial = None
    for step in range(steps):
        direction = _unit(grad)
        if direction is None:
            break
        _ascend_in_ball(embedding, saved, direction, alpha, epsilon)
        adversarial = compute_loss()
        if step < steps - 1:
            grad = torch.autograd.grad(adversarial, embedding)[0]
    with torch.no_grad():
        embedding.copy_(saved)
    if adversarial is None:
        backward(loss)
        return loss, loss.detach()
    backward(loss + adversarial)
    return loss, adversarial


def gradient_penalty(loss: torch.Tensor, embedding: torch.Tensor, epsilon: float = 1.0) -> torch.Tensor:
    """loss + epsilon/2 * ||dloss/dE||^2 (bert4keras), with a real second-order gradient (create_graph=True): the
    penalty's own gradient reaches every parameter upstream of the loss. Fused attention kernels (SDPA's flash
    path, the Triton kernels) have no double backward: the model must use attention_backend="reference"."""
    (grad,) = torch.autograd.grad(loss, embedding, create_graph=True)
    return loss + 0.5 * epsilon * grad.pow(2).sum()


@register_trick
class Adversarial(Trick):
    """FGM, PGD or the gradient penalty on the task's token embedding (`tricks.adversarial`)."""
    name = "adversarial"
    changes_pretrained_model = True

    class Settings(Trick.Settings):
        adversarial: Literal["none", "fgm", "pgd", "gradient_penalty"] = "none"
        adversarial_epsilon: float = Field(1.0, gt=0)  # bert4torch 1.0 (bert4keras' IFLYTEK example: FGM 0.5)
        pgd_alpha: float = Field(0.3, gt=0)
        pgd_steps: int = Field(3, ge=1)

    @staticmethod
    def active(tricks):
        return tricks.adversarial != "none"

    @staticmethod
    def check(cfg, task):
        if cfg.train.zero_stage is not None and cfg.tricks.ptuning != "none":
            raise ValueError("under a DeepSpeed engine the adversarial tricks run one backward, which P-tuning's "
                             "tied MLM decoder cannot share with a perturbed embedding: drop one of them")

    def model_overrides(self, overrides):
        if self.settings.adversarial == "gradient_penalty":  # it differentiates through attention twice: only
            return {**overrides, "attention_backend": "reference"}  # the reference backend can
        return overrides

    def setup(self, model, trainable, task, train):
        self.embedding, self.trainable = task.embedding(model), trainable
        # A DeepSpeed engine accepts one backward per step: the clean and adversarial losses go back together.
        self.one_backward = self.cfg.train.zero_stage is not None

    def backward(self, compute_loss, backward):
        s = self.settings
        if s.adversarial == "fgm":
            return fgm_backward(compute_loss, self.embedding, s.adversarial_epsilon, backward,
                                one_backward=self.one_backward)[0]
        if s.adversarial == "pgd":
            return pgd_backward(compute_loss, self.embedding, self.trainable, s.adversarial_epsilon, s.pgd_alpha,
                                s.pgd_steps, backward, one_backward=self.one_backward)[0]
        loss = gradient_penalty(compute_loss(), self.embedding, s.adversarial_epsilon)
        backward(loss)
        return loss
