"""What the fine-tuning loop asks of a trick: a name, its settings, when they switch it on, which configs it cannot
run with, and hooks at the points of the loop where tricks act. Every hook's default leaves the loop as it is, so a
trick implements only its own; the loop calls the active tricks' hooks in registration order.

A trick is one module: its tensor-level functions (tested alone against their definitions) and one `Trick`
subclass registered with `@register_trick`, plus its import line in `suformer/finetune/tricks/__init__.py`. The config's
`tricks` section is the union of the registered tricks' `Settings` (`settings_fields`), so a trick's keys live
with it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from pydantic import BaseModel

LossClosure = Callable[[], torch.Tensor]  # recomputes the batch's loss (adversarial tricks call it twice)

TRICKS: dict[str, type["Trick"]] = {}


def register_trick(cls):
    if cls.name in TRICKS:
        raise ValueError(f"trick {cls.name!r} is registered twice")
    TRICKS[cls.name] = cls
    return cls


class Trick:
    name = ""
    # Whether it trains, perturbs or replaces the pretrained model, which the tricks that freeze it cannot run beside.
    changes_pretrained_model = False

    class Settings(BaseModel):
        """The trick's keys in the config's `tricks` section, each defaulting to off; the first switches it on."""

    @classmethod
    def switch(cls) -> str:
        return next(iter(cls.Settings.model_fields))

    def __init__(self, cfg):
        self.cfg, self.settings = cfg, cfg.tricks  # the FinetuneConfig and its `tricks` section

    @staticmethod
    def active(tricks) -> bool:
        """Whether the `tricks` section switches this trick on."""
        raise NotImplementedError

    @staticmethod
    def check(cfg, task) -> None:
        """Raise a ValueError naming the key when this trick cannot run with the rest of `cfg` (`task`: the Task
        class of `data.task`). Called only when the trick is active."""

    # -- building the model ---------------------------------------------------------------------------------------
    def model_overrides(self, overrides: dict) -> dict:
        """Arguments of the encoder's constructor (dropout, attention backend)."""
        return overrides

    def head(self, task, encoder, tokenizer) -> Optional[torch.nn.Module]:
        """A model that replaces the task's head, or None."""
        return None

    def wrap_model(self, model: torch.nn.Module, task) -> torch.nn.Module:
        return model

    def parameter_groups(self, model: torch.nn.Module, groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups (one group of every trainable parameter by default)."""
        return groups

    def setup(self, model: torch.nn.Module, trainable: list, task, train: list) -> None:
        """Once, after the optimizer is built and before the DeepSpeed engine (if any) wraps the model."""

    # -- each step ------------------------------------------------------------------------------------------------
    def transform_batch(self, batch: dict, model: torch.nn.Module) -> dict:
        return batch

    def loss(self, batch: dict, model: torch.nn.Module) -> Optional[LossClosure]:
        """A closure computing this trick's loss instead of the model's, or None."""
        return None

    def backward(self, compute_loss: LossClosure, backward: Callable) -> Optional[torch.Tensor]:
        """Run the backward pass(es) itself and return the loss to record, or None for the plain backward."""
        return None

    def after_backward(self) -> None:
        """Before the optimizer step: the gradients are there to edit."""

    def after_step(self, model: torch.nn.Module) -> None:
        pass

    # -- evaluating and saving ------------------------------------------------------------------------------------
    def eval_model(self, model: torch.nn.Module) -> Optional[torch.nn.Module]:
        """The model to evaluate and keep instead of the trained one, or None."""
        return None

    def final_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The best model as saved (e.g. adapters merged)."""
        return model


def settings_fields() -> dict:
    """Every registered trick's settings as pydantic field definitions, for the config's `tricks` section."""
    fields = {}
    for trick in TRICKS.values():
        for key, field in trick.Settings.model_fields.items():
            if key in fields:
                raise ValueError(f"tricks.{key} is declared by two tricks (the second: {trick.name})")
            fields[key] = (field.annotation, field)
    return fields


def active_tricks(cfg) -> list[Trick]:
    """The tricks `cfg.tricks` switches on, built for this run, in registration order."""
    return [trick(cfg) for trick in TRICKS.values() if trick.active(cfg.tricks)]


def check_seq2seq(cfg, task, key: str) -> None:
    if not task.seq2seq:
        raise ValueError(f"tricks.{key} is a seq2seq trick; task {cfg.data.task!r} has no decoder")


def check_frozen_model_trick(cfg, task, key: str, name: str) -> None:
    """The rules of a trick that freezes the whole pretrained model and trains a small part beside it."""
    from ..tasks.classification import ClassificationTask

    if not issubclass(task, ClassificationTask):
        raise ValueError(f"tricks.{key}: {name} is built for the classification tasks (data.task=sentiment "
                         "or classification)")
    clash = [trick.switch() for trick in TRICKS.values()
             if trick.changes_pretrained_model and trick.switch() != key and trick.active(cfg.tricks)]
    if clash:
        raise ValueError(f"tricks.{key}: {name} freezes the whole pretrained model, so tricks.{clash[0]} "
                         "(which trains, perturbs or replaces it) cannot be combined with it")
