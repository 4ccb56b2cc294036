"""Attention for both models: one entry point, `attention(q, k, v, position=..., mask=..., backend=...)`.

Models describe *what* to compute (position scheme and mask as small inputs: positions.py, masks.py); a backend
decides *how*. "reference" and "sdpa" (backends.py) need torch alone; the fused Triton kernels (triton/) compute
the T5 bucket, RoPE and masks in-kernel from the same descriptions and are imported on first use (registry.py).
This package imports nothing of suformer.models: the models import it.

Shapes: q [B, H, Lq, D], k and v [B, H, Lk, D]. Query i sits at absolute position `query_offset + i`, key j at j
(decoding with a KV cache, or UniLM queries that are the tail of the sequence).
"""
from .cache import KVCache
from .masks import AttentionMask, logn_factor
from .positions import (
    PositionScheme, Rotary, T5RelativeBias, apply_rotary, relative_position_bucket, rotary_cos_sin, rotate_qk,
)
from .registry import attention, available_backends, register_backend

__all__ = [
    "AttentionMask", "KVCache", "PositionScheme", "Rotary", "T5RelativeBias", "apply_rotary", "attention",
    "available_backends", "logn_factor", "register_backend", "relative_position_bucket", "rotary_cos_sin",
    "rotate_qk",
]
