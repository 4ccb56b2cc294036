"""LoRA through PEFT (kexue.fm/archives/9590): W = W0 + (alpha / r) B A with B = 0 at the start, so the adapted model
begins as the pretrained one; only the adapters (and the task head) train, and merging folds them into W0 for
inference at no extra cost. RoFormerV2 is not in PEFT's default target map, so each family's spec names its
projections (`lora_targets`)."""
from __future__ import annotations

import torch
from pydantic import Field

from ...models import FAMILIES
from .base import Trick, register_trick

def apply_lora(model: torch.nn.Module, family: str, r: int = 8, alpha: int = 8, dropout: float = 0.0,
               targets: list[str] | None = None, trainable_modules: list[str] | None = None):
    """The PEFT-wrapped model; `trainable_modules` (e.g. a classifier head) train in full and are saved with it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=targets or list(FAMILIES[family].lora_targets), modules_to_save=trainable_modules)
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@register_trick
class LoRA(Trick):
    name = "lora"
    changes_pretrained_model = True

    class Settings(Trick.Settings):
        lora_r: int = Field(0, ge=0)  # 0 off; PEFT's default 8
        lora_alpha: int = Field(8, gt=0)

    @staticmethod
    def active(tricks):
        return tricks.lora_r > 0

    @staticmethod
    def check(cfg, task):
        tricks = cfg.tricks
        if tricks.adversarial != "none":
            raise ValueError(f"tricks.adversarial={tricks.adversarial} perturbs along the embedding gradient, which "
                             "LoRA (tricks.lora_r) freezes: use one or the other")
        if tricks.child_tuning != "none":
            raise ValueError("tricks.child_tuning masks full-model gradients; with LoRA only adapters train")

    def wrap_model(self, model, task):
        return apply_lora(model, self.cfg.model.family, r=self.settings.lora_r, alpha=self.settings.lora_alpha,
                          trainable_modules=task.head_modules or None)

    def final_model(self, model):
        return model.merge_and_unload()
