"""The fine-tuning tasks by name. A task module registers its Task subclass with `@register_task("name")`; the
config validator and the fine-tuning loop look tasks up here, so adding one is its module plus one import line in
`suformer/finetune/tasks/__init__.py`."""
from __future__ import annotations

TASKS: dict[str, type] = {}


def register_task(name: str):
    """Class decorator: the task `data.task: <name>` selects."""
    def register(cls):
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice: {TASKS[name].__qualname__} and {cls.__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls
    return register
