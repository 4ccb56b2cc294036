"""Fine-tuning tasks: benchmark readers, heads, losses and metrics."""
from __future__ import annotations


def task_for(cfg):
    """The Task (see tasks/base.py) that `cfg.data.task` names."""
    if cfg.data.task == "sentiment":
        from .classification import SentimentTask as task
    elif cfg.data.task == "classification":
        from .classification import ClueClassificationTask as task
    elif cfg.data.task == "similarity":
        from .similarity import SimilarityTask as task
    elif cfg.data.task == "ner":
        from .ner import NERTask as task
    elif cfg.data.task == "idiom":
        from .idiom import IdiomTask as task
    elif cfg.data.task == "title":
        from .title import TitleTask as task
    else:
        raise ValueError(f"unknown task {cfg.data.task!r}")
    return task(cfg)
