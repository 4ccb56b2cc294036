"""The backends that need nothing but torch: "reference" and "sdpa".

The reference backend materialises everything in the input dtype (use float64 for ground truth); the SDPA backend
materialises only what `scaled_dot_product_attention` cannot compute itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import logn_factor
from .positions import Rotary, T5RelativeBias, rotate_qk


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
        # Rows that see no key (a padded query row of a UniLM batch, say) see every key instead, and are zeroed
        # after: no NaN. Unconditional, so there is no host sync on a GPU, nor a graph break under torch.compile.
        empty_rows = ~allowed.any(dim=-1, keepdim=True)
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


BACKENDS = {"reference": _reference, "sdpa": _sdpa}
