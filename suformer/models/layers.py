"""Building blocks shared by the models and their tasks: the logits' dtype and T5's feed-forward layer.

Norms are torch's own `nn.RMSNorm` (with gain for T5, parameter-free for RoFormerV2); position schemes live with
attention (suformer.attention.positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for a softmax or loss; float64 stays float64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class T5GatedFFN(nn.Module):
    """T5.1.1 feed-forward: (act(x W_i0) * (x W_i1)) W_o, no biases.

    `inner_dropout` is transformers' extra dropout after the gate (bert4keras has none).
    """

    def __init__(self, d_model: int, d_ff: int, gelu_approximate: str, inner_dropout: float):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.gelu_approximate = gelu_approximate
        self.dropout = nn.Dropout(inner_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.wi_0(x), approximate=self.gelu_approximate)
        return self.wo(self.dropout(gate * self.wi_1(x)))
