"""Layer-wise learning-rate decay: the top block trains at the base rate, each block below at `decay` times the one
above, the embeddings below the lowest block; task heads keep the base rate. Works on any model whose block
parameters are named `...layer.<i>.` (RoFormerV2) or `...block.<i>.` (T5, each stack on its own)."""
from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:layer|block)\.(\d+)\.")


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
