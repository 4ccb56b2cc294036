"""What the models, tasks and tricks share: the logits' dtype.

Norms are torch's own `nn.RMSNorm` (with gain for T5, parameter-free for RoFormerV2); position schemes live with
attention (suformer.attention.positions).
"""
from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for a softmax or loss; float64 stays float64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
