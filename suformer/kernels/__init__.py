"""Fused Triton attention kernels, plugged in behind `suformer.models.attention` as backends:

- "triton": the default on CUDA (`attention_backend="auto"`); RoPE placement is `ROPE_IN_KERNEL`.
- "triton_rope_in_kernel" / "triton_rope_outside": RoPE rotated on q/k tiles inside the kernel, or applied by
  torch before it; both stay available so they can be measured against each other (benchmarks/attention.py).

On CPU the kernels run under the Triton interpreter (`TRITON_INTERPRET=1`, set before importing triton): slow and
fp32, for tests at small shapes. `configs.py` holds the GPU tile candidates, `compile_check.py` compiles every launch
for A100/H100 without a GPU, `profiles.py` names the ways the kernels are called.
"""
from __future__ import annotations

import functools

from ..models.attention import Rotary, T5RelativeBias, register_backend, rotate_qk
from .flash import RelativeBias, dropout_keep_mask, flash_attention

# In-kernel RoPE saves two elementwise passes over q and k (and their backward) at the cost of re-rotating each
# k tile once per query block. Chosen until GPU measurements in benchmarks/RESULTS.md say otherwise.
ROPE_IN_KERNEL = True


def triton_attention(q, k, v, *, position, mask, scale, dropout_p, query_offset, logn_base, rope_in_kernel=None):
    """The model-facing backend: translate a position scheme and AttentionMask into the kernel's inputs."""
    rope_in_kernel = ROPE_IN_KERNEL if rope_in_kernel is None else rope_in_kernel
    bias = rotary_base = None
    if isinstance(position, T5RelativeBias):
        bias = RelativeBias(position.table, position.bidirectional, position.max_distance)
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
        window=mask.window if mask is not None else None,
        query_offset=query_offset, logn_base=logn_base, dropout_p=dropout_p,
    )


register_backend("triton", triton_attention)
register_backend("triton_rope_in_kernel", functools.partial(triton_attention, rope_in_kernel=True))
register_backend("triton_rope_outside", functools.partial(triton_attention, rope_in_kernel=False))

__all__ = ["ROPE_IN_KERNEL", "RelativeBias", "dropout_keep_mask", "flash_attention", "triton_attention"]
