"""Building blocks shared by T5 PEGASUS and RoFormerV2: position schemes and feed-forward layers.

Norms are torch's own `nn.RMSNorm` (with gain for T5, parameter-free for RoFormerV2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for a softmax or loss; float64 stays float64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of `relative_position = key_pos - query_pos` (mesh-TF / bert4keras formula).

    Bidirectional: half the buckets per side, keys after the query in the upper half.
    Unidirectional: only keys at or before the query are distinguished (`max(query - key, 0)`), which is also what
    bert4keras' T5 decoder cross-attention uses (decoder position i against encoder position j).
    Exact buckets for small distances, log-spaced ones up to `max_distance`, clipped beyond.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of `position * base^(-2i/d)`, each repeated for its adjacent pair: shape [..., L, head_dim]."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=compute) / head_dim)
    angles = positions.to(compute)[..., None] * inv_freq
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by their angle (GPT-J / bert4keras convention, not rotate_half)."""
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


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
