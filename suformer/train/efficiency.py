"""The switches that trade memory, compute and compile time, applied to a model before it is trained: activation
checkpointing (`train.activation_checkpointing`) and torch.compile (`train.compile`), for both families in both
halves. Each model's stacks of layers (`models.layers.LayerStack`) are where they act, as in torchtitan: a layer is
checkpointed or compiled as a whole, the glue between layers (embeddings, masks, the head and loss) stays eager."""
from __future__ import annotations

from typing import Literal

from torch import nn

from ..models.layers import LayerStack

CheckpointMode = Literal["none", "full", "selective"]


def layer_stacks(model: nn.Module) -> list[LayerStack]:
    stacks = [m for m in model.modules() if isinstance(m, LayerStack)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of layers (models.layers.LayerStack) to act on")
    return stacks


def set_activation_checkpointing(model: nn.Module, mode: CheckpointMode, every: int = 2) -> list[int]:
    """Recompute the activations of every layer ("full"), of every `every`-th layer of each stack from the first
    ("selective"), or of none; returns how many layers of each stack are checkpointed."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    counts = []
    for stack in layer_stacks(model):
        size = len(stack.stacked_layers())
        chosen = {"none": [], "full": range(size), "selective": range(0, size, every)}[mode]
        stack.checkpointed_layers = frozenset(chosen)
        counts.append(len(stack.checkpointed_layers))
    return counts


def compile_layers(model: nn.Module) -> int:
    """torch.compile each layer of each stack in place (its weights and their names unchanged); returns how many.
    Compilation itself happens at each layer's first call."""
    count = 0
    for stack in layer_stacks(model):
        for layer in stack.stacked_layers():
            layer.compile()
            count += 1
        stack.compiled = True
    return count


def apply_efficiency(model: nn.Module, activation_checkpointing: CheckpointMode = "none", every: int = 2,
                     compile: bool = False) -> str:
    """Both switches on a model about to be trained; returns what was done, as a line for the log."""
    counts = set_activation_checkpointing(model, activation_checkpointing, every)
    total = sum(len(stack.stacked_layers()) for stack in layer_stacks(model))
    done = [f"activation checkpointing {activation_checkpointing}"
            + (f" ({sum(counts)} of {total} layers)" if activation_checkpointing != "none" else "")]
    if compile:
        done.append(f"torch.compile on each of {compile_layers(model)} layers")
    return ", ".join(done)
