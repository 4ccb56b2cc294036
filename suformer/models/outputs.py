"""The one output type of suformer's models and task heads: `.logits` always, `.loss` when labels were given."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor  # scores over the vocabulary, classes, span pairs, or a pair's cosine
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None  # RoFormerV2: the last layer's
    encoder_hidden_states: Optional[torch.Tensor] = None  # T5: the encoder's output, reused while decoding
