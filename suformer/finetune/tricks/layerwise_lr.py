"""Layer-wise learning-rate decay: the top block trains at the base rate, each block below at `decay` times the one
above, the embeddings below the lowest block; task heads keep the base rate. Works on any model whose block
parameters are named `...layers.<i>.` (RoFormerV2) or `...blocks.<i>.` (T5, each stack on its own)."""
from __future__ import annotations

import re

from typing import Optional

import torch
from pydantic import Field

from .base import Trick, register_trick

_BLOCK = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")


def layerwise_lr_groups(model: torch.nn.Module, lr: float, decay: float, weight_decay: float = 0.0) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth = 1 + max((int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))), default=-1)

    def scale(name: str) -> float:
        if m := _BLOCK.search(name):
            return decay ** (depth - 1 - int(m.group(1)))
        if "embed" in name or name.startswith("shared"):
            return decay ** depth
        return 1.0

    groups: dict[float, dict] = {}
    for name, p in named:
        s = scale(name)
        group = groups.setdefault(s, {"params": [], "names": [], "lr": lr * s, "weight_decay": weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda g: g["lr"])


@register_trick
class LayerwiseLR(Trick):
    name = "layerwise_lr"

    class Settings(Trick.Settings):
        layerwise_lr_decay: Optional[float] = Field(None, gt=0, le=1)

    @staticmethod
    def active(tricks):
        return tricks.layerwise_lr_decay is not None

    def parameter_groups(self, model, groups):
        by_depth = layerwise_lr_groups(model, self.cfg.train.lr, self.settings.layerwise_lr_decay,
                                       groups[0]["weight_decay"])
        return [{k: v for k, v in group.items() if k != "names"} for group in by_depth]
