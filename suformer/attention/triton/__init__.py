"""Fused Triton attention kernels, plugged in behind `suformer.attention.attention` as backends:

- "triton": the default on CUDA (`attention_backend="auto"`); RoPE placement is `ROPE_IN_KERNEL`.
- "triton_rope_in_kernel" / "triton_rope_outside": RoPE rotated on q/k tiles inside the kernel, or applied by
  torch before it; both stay available so they can be measured against each other (benchmarks/attention.py).

The registry imports this package and adds its BACKENDS on first use of a "triton*" backend, so only that first
use imports triton.
On CPU the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, set before importing triton): slow and
fp32, for tests at small shapes. `configs.py` holds the GPU tile candidates, `compile_check.py` compiles every launch
for A100/H100 without a GPU, `profiles.py` names the ways the kernels are called.
"""
from __future__ import annotations

import functools

from ..positions import Rotary, T5RelativeBias, rotate_qk
from .flash import dropout_keep_mask, flash_attention

# In-kernel RoPE saves two elementwise passes over q and k (and their backward) at the cost of re-rotating each
# k tile once per query block. Chosen until GPU measurements in benchmarks/RESULTS.md say otherwise.
ROPE_IN_KERNEL = True


def triton_attention(q, k, v, *, position, mask, scale, dropout_p, query_offset, logn_base, rope_in_kernel=None):
    """The model-facing backend: translate a position scheme and AttentionMask into the kernel's inputs (a
    T5RelativeBias is passed on as it is)."""
    rope_in_kernel = ROPE_IN_KERNEL if rope_in_kernel is None else rope_in_kernel
    bias = rotary_base = None
    if isinstance(position, T5RelativeBias):
        bias = position
    elif isinstance(position, Rotary):
        if rope_in_kernel:
            rotary_base = position.base
        else:
            q, k = rotate_qk(q, k, position, query_offset)
    return flash_attention(
        q, k, v, scale=scale, bias=bias, rotary_base=rotary_base,
        key_padding=mask.key_padding if mask is not None else None,
        causal=mask is not None and mask.causal,
        segment_ids=mask.segment_ids if mask is not None else None,
        document_ids=mask.document_ids if mask is not None else None,
        window=mask.window if mask is not None else None,
        query_offset=query_offset, logn_base=logn_base, dropout_p=dropout_p,
    )


# The backends this package adds to the registry when it is first asked for one of them.
BACKENDS = {
    "triton": triton_attention,
    "triton_rope_in_kernel": functools.partial(triton_attention, rope_in_kernel=True),
    "triton_rope_outside": functools.partial(triton_attention, rope_in_kernel=False),
}

__all__ = ["BACKENDS", "ROPE_IN_KERNEL", "dropout_keep_mask", "flash_attention", "triton_attention"]
