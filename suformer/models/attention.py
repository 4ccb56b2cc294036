"""The one attention entry point of both models.

Models describe *what* to compute (position scheme and mask as small inputs); a backend decides *how*. The
reference backend materialises everything in the input dtype (use float64 for ground truth); the SDPA backend
materialises only what `scaled_dot_product_attention` cannot compute itself; a fused kernel (suformer.kernels)
computes the T5 bucket, RoPE and masks in-kernel from the same description.

Shapes: q [B, H, Lq, D], k and v [B, H, Lk, D]. Query i sits at absolute position `query_offset + i`, key j at j
(decoding with a KV cache, or UniLM queries that are the tail of the sequence).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .layers import apply_rotary, relative_position_bucket, rotary_cos_sin


@dataclass(eq=False)
class T5RelativeBias:
    """T5 bucketed relative position bias: `table[bucket(key_pos - query_pos), head]` added to the scores.

    One description is built per forward pass and shared by all layers of a stack, so the bias a backend
    materialises is computed once per pass (and its gradient flows into `table` once).
    """

    table: torch.Tensor  # [num_buckets, heads]
    bidirectional: bool
    max_distance: int = 128
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
        key = (query_len, key_len, query_offset)
        if key not in self._materialised:
            bias = F.embedding(self.buckets(query_len, key_len, query_offset), self.table)  # [Lq, Lk, H]
            self._materialised[key] = bias.permute(2, 0, 1).unsqueeze(0)
        return self._materialised[key]


@dataclass(frozen=True)
class Rotary:
    """RoPE on q and k (adjacent pairs over the full head dim), at their absolute positions."""

    base: float = 10000.0


PositionScheme = Optional[T5RelativeBias | Rotary]


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, from small inputs; every field optional and combined with AND.

    key_padding: [B, Lk] bool, True for real tokens.
    causal: keys at positions <= the query's.
    segment_ids: [B, Lk] UniLM segments (0 source, 1 target): source is bidirectional, target causal.
    window: keys within `window` positions of the query (on the left only when causal).
    """

    key_padding: Optional[torch.Tensor] = None
    causal: bool = False
    segment_ids: Optional[torch.Tensor] = None
    window: Optional[int] = None

    def is_empty(self) -> bool:
        return self.key_padding is None and not self.causal and self.segment_ids is None and self.window is None

    def dense(self, query_len: int, key_len: int, query_offset: int, device) -> Optional[torch.Tensor]:
        """The mask as a bool tensor broadcastable to [B, 1, Lq, Lk]; None when everything is visible."""
        allowed = None

        def combine(more: torch.Tensor) -> None:
            nonlocal allowed
            allowed = more if allowed is None else allowed & more

        if self.causal or self.window is not None:
            query_pos = torch.arange(query_offset, query_offset + query_len, device=device)[:, None]
            key_pos = torch.arange(key_len, device=device)[None, :]
            if self.causal:
                combine(key_pos <= query_pos)
            if self.window is not None:
                combine((query_pos - key_pos).abs() <= self.window)
        if self.segment_ids is not None:
            # bert4keras UniLM_Mask: key j is visible to query i iff cumsum(seg)[j] <= cumsum(seg)[i].
            cum = self.segment_ids.cumsum(dim=1)
            query_cum = cum[:, query_offset : query_offset + query_len]
            combine((cum[:, None, :] <= query_cum[:, :, None])[:, None])
        if self.key_padding is not None:
            combine(self.key_padding.bool()[:, None, None, :])
        return allowed


class KVCache:
    """Keys/values per layer for incremental decoding: self-attention entries grow with every step, cross-attention
    entries (T5's encoder keys/values) are computed once."""

    def __init__(self, num_layers: int):
        self.self_kv: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers
        self.cross_kv: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers

    @property
    def length(self) -> int:
        """Positions already cached: the absolute position of the next query."""
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys/values of one layer; returns all keys/values so far."""
        if self.self_kv[layer] is not None:
            k = torch.cat([self.self_kv[layer][0], k], dim=2)
            v = torch.cat([self.self_kv[layer][1], v], dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (beam search)."""
        for store in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(store):
                if kv is not None:
                    store[i] = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))


Backend = Callable[..., torch.Tensor]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # a path search: once, not per attention call


def _backend(name: str, q: torch.Tensor) -> Backend:
    """Look a backend up; "auto" is the Triton kernels on CUDA (when triton is installed), SDPA elsewhere. The
    kernels module registers itself on first use, so importing the models never imports triton."""
    if name == "auto":
        name = "triton" if q.is_cuda and _triton_installed() else "sdpa"
    if name not in _BACKENDS and name.startswith("triton"):
        importlib.import_module("suformer.kernels")
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()}") from None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    position: PositionScheme = None,
    mask: Optional[AttentionMask] = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    query_offset: int = 0,
    logn_base: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(scale * q k^T + position bias, masked) v, with fully masked query rows returning zeros.

    `logn_base` turns on Su's entropy-invariant scaling: the scale of q k^T is multiplied by log(n)/log(logn_base),
    n the sequence's number of real keys, so attention entropy stays put when n grows past the training length.
    """
    fn = _backend(backend, q)
    mask = None if mask is None or mask.is_empty() else mask
    return fn(q, k, v, position=position, mask=mask, scale=scale, dropout_p=dropout_p, query_offset=query_offset,
              logn_base=logn_base)


def logn_factor(key_padding: Optional[torch.Tensor], batch: int, key_len: int, logn_base: int, device) -> torch.Tensor:
    """[B] multiplier log(n)/log(base) of entropy-invariant attention, n = real keys per sequence."""
    if key_padding is not None:
        real_keys = key_padding.sum(dim=1).clamp(min=1).double()
    else:
        real_keys = torch.full((batch,), float(key_len), dtype=torch.float64, device=device)
    return real_keys.log() / math.log(logn_base)


def rotate_qk(q, k, rotary: Rotary, query_offset: int):
    head_dim = q.shape[-1]
    cos_q, sin_q = rotary_cos_sin(
        torch.arange(query_offset, query_offset + q.shape[2], device=q.device), head_dim, rotary.base, q.dtype
    )
    cos_k, sin_k = rotary_cos_sin(torch.arange(k.shape[2], device=k.device), head_dim, rotary.base, k.dtype)
    return apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)


def _scaled_queries(q, mask, logn_base, key_len):
    """q times its per-sequence log-n factor (scores scale linearly in q)."""
    if logn_base is None:
        return q
    key_padding = mask.key_padding if mask is not None else None
    return q * logn_factor(key_padding, q.shape[0], key_len, logn_base, q.device).to(q.dtype)[:, None, None, None]


def _reference(q, k, v, *, position, mask, scale, dropout_p, query_offset, logn_base):
    """Materialise scores, bias and mask; the obviously-correct path (and ground truth in float64)."""
    if isinstance(position, Rotary):
        q, k = rotate_qk(q, k, position, query_offset)
    q = _scaled_queries(q, mask, logn_base, k.shape[2])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if isinstance(position, T5RelativeBias):
        scores = scores + position.materialise(q.shape[2], k.shape[2], query_offset).to(scores.dtype)
    allowed = None if mask is None else mask.dense(q.shape[2], k.shape[2], query_offset, q.device)
    if allowed is not None:
        has_key = allowed.any(dim=-1, keepdim=True)
        # Fully masked rows get a harmless all-visible softmax and are zeroed after, so no NaN reaches autograd.
        scores = scores.masked_fill(~(allowed | ~has_key), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(~has_key, 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _sdpa(q, k, v, *, position, mask, scale, dropout_p, query_offset, logn_base):
    """torch SDPA: RoPE applied to q/k, causal/padding passed in SDPA's own compact forms where it can take them."""
    if isinstance(position, Rotary):
        q, k = rotate_qk(q, k, position, query_offset)
    q = _scaled_queries(q, mask, logn_base, k.shape[2])
    query_len, key_len = q.shape[2], k.shape[2]
    is_causal = False
    bias = position.materialise(query_len, key_len, query_offset) if isinstance(position, T5RelativeBias) else None
    if (
        mask is not None
        and mask.causal
        and query_offset == 0
        and query_len == key_len
        and bias is None
        and mask.key_padding is None
        and mask.segment_ids is None
        and mask.window is None
    ):
        is_causal, allowed = True, None  # flash-eligible: nothing materialised
    else:
        allowed = None if mask is None else mask.dense(query_len, key_len, query_offset, q.device)
    empty_rows = None
    if allowed is not None:
        has_key = allowed.any(dim=-1, keepdim=True)
        if not bool(has_key.all()):
            empty_rows = ~has_key
            allowed = allowed | empty_rows
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if allowed is not None:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    else:
        attn_mask = allowed
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


register_backend("reference", _reference)
register_backend("sdpa", _sdpa)
