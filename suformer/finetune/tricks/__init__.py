"""Su Jianlin's fine-tuning tricks, one small module each, plain PyTorch (kexue.fm posts cited per module).

Each module's functions take tensors, parameters or loss closures, never a training loop, so the unit tests check
each against its definition on its own; its `Trick` subclass (see `base.Trick`) plugs it into the fine-tuning loop
through hooks and states which configs it cannot run with.
"""
from . import (adversarial, child_tuning, ema, exposure_bias, ladder_side, layerwise_lr, lora,  # noqa: F401
               prompt_tuning, ptuning, rdrop, simcse, sparse_softmax)  # each module registers its trick
from .base import TRICKS, Trick, active_tricks, register_trick, settings_fields

__all__ = ["TRICKS", "Trick", "active_tricks", "register_trick", "settings_fields"]
