"""Fine-tuning tasks: benchmark readers, heads, losses and metrics, one module each (see `base.Task`)."""
from __future__ import annotations

from . import classification, idiom, ner, sentiment, similarity, title  # noqa: F401  (each registers its tasks)
from .registry import TASKS, register_task


def task_for(cfg):
    """The Task that `cfg.data.task` names (the config has checked that it is registered)."""
    return TASKS[cfg.data.task](cfg)


__all__ = ["TASKS", "register_task", "task_for"]
