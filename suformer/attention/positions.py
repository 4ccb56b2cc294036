"""Position schemes: T5's bucketed relative bias and RoPE, as descriptions every backend reads, plus their math.

A description carries only the small inputs (the bias table, the RoPE base); each backend decides whether to
materialise the bias or rotate q/k itself, or, like the Triton kernels, compute both in-kernel from the same
description. The functions below are the one definition of the bucketing and the rotation that all of them share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


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


@dataclass(eq=False)
class T5RelativeBias:
    """T5 bucketed relative position bias: `table[bucket(key_pos - query_pos), head]` added to the scores.

    One description is built per forward pass and shared by all layers of a stack, so the bias a backend
    materialises is computed once per pass (and its gradient flows into `table` once). Not with `shared=False`:
    a layer whose activations are recomputed in the backward pass (activation checkpointing) must compute its
    bias itself, or its recomputation would skip the work its first forward did; so must a compiled layer, a
    graph of its own.
    """

    table: torch.Tensor  # [num_buckets, heads]
    bidirectional: bool
    max_distance: int = 128
    shared: bool = True
    _materialised: dict = field(default_factory=dict, repr=False)

    @property
    def num_buckets(self) -> int:
        return self.table.shape[0]

    def buckets(self, query_len: int, key_len: int, query_offset: int = 0) -> torch.Tensor:
        device = self.table.device
        query_pos = torch.arange(query_offset, query_offset + query_len, device=device)
        key_pos = torch.arange(key_len, device=device)
        return relative_position_bucket(
            key_pos[None, :] - query_pos[:, None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def materialise(self, query_len: int, key_len: int, query_offset: int = 0) -> torch.Tensor:
        """The bias as [1, H, Lq, Lk]; cached for the lifetime of this description (one forward pass)."""
        if not self.shared:  # no lookup either: under torch.compile a key of lengths would fix them as constants
            return self._bias(query_len, key_len, query_offset)
        key = (query_len, key_len, query_offset)
        if key not in self._materialised:
            self._materialised[key] = self._bias(query_len, key_len, query_offset)
        return self._materialised[key]

    def _bias(self, query_len: int, key_len: int, query_offset: int) -> torch.Tensor:
        return F.embedding(self.buckets(query_len, key_len, query_offset), self.table).permute(2, 0, 1).unsqueeze(0)


@dataclass(frozen=True)
class Rotary:
    """RoPE on q and k (adjacent pairs over the full head dim), at their absolute positions."""

    base: float = 10000.0


PositionScheme = Optional[T5RelativeBias | Rotary]


def rotate_qk(q, k, rotary: Rotary, query_offset: int):
    """q and k rotated by torch at their absolute positions (queries from `query_offset`, keys from 0)."""
    head_dim = q.shape[-1]
    cos_q, sin_q = rotary_cos_sin(
        torch.arange(query_offset, query_offset + q.shape[2], device=q.device), head_dim, rotary.base, q.dtype
    )
    cos_k, sin_k = rotary_cos_sin(torch.arange(k.shape[2], device=k.device), head_dim, rotary.base, k.dtype)
    return apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)
