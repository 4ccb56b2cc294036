"""FlashAttention-2-style Triton kernels with the T5 bucketed bias, RoPE, masks and dropout computed in-kernel.

Forward: one program per (query block, batch*head), online softmax in base 2, log-sum-exp saved.
Backward: recompute from the log-sum-exp, no atomics (deterministic): one kernel walks query blocks for a key block
(dK, dV and the bias-table gradient), one walks key blocks for a query block (dQ).

What is computed in-kernel from small inputs, never as an [Lq, Lk] tensor:
- T5 bias: `table[bucket(key_pos - query_pos), head]`. Buckets are constant beyond +-max_distance, so the host
  builds a [2*max_distance+1] bucket lookup and a [heads, 2*max_distance+1] bias lookup from the table; the kernel
  gathers from them with the clamped distance. d(table) is reduced inside each key-block program over all its
  query blocks (per tile: one masked sum per bucket present in the tile, which is a single bucket for tiles beyond
  max_distance) and written once per (program, bucket); the host sums those partials.
- RoPE (adjacent pairs) on q and k tiles as they are loaded; dq/dk are rotated back in the epilogue.
- Masks: per-key padding (plus each sequence's last real key, so blocks past it are skipped), causal, sliding
  window, UniLM as a per-query visible-key prefix (keys with cumsum(segment) <= the query's form a prefix), and
  packed documents as a per-query visible-key range (the query's own document's run).
  Blocks outside the visible range are never visited; rows with no visible key give zeros, not NaN.
- Dropout on the probabilities from a counter-based RNG (Philox) keyed by (seed, batch*head) and the element's
  (query, key) index, so the backward regenerates the same mask.

Tiles: each kernel has its own (BLOCK_M, BLOCK_N, warps, stages), chosen per GPU architecture and head dim among
the compile-checked candidates of configs.py; `triton.autotune` times them once per shape class (the `tune_lq` and
`tune_lk` arguments, read by no kernel, are that key's lengths). Without tuning, float32 on a GPU (tests) takes one
small tile; the CPU interpreter always does.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..masks import document_runs, logn_factor
from ..positions import T5RelativeBias, relative_position_bucket, rotary_cos_sin
from . import configs

LOG2E = 1.4426950408889634

# On a GPU, pick each kernel's tile by timing the compile-checked candidates (configs.py) once per shape class;
# off (SUFORMER_KERNEL_AUTOTUNE=0, e.g. in a Ray job's runtime_env): the first candidate, no tuning time.
AUTOTUNE = os.environ.get("SUFORMER_KERNEL_AUTOTUNE", "1") != "0"

# A random dropout seed and the tuning key's length classes would otherwise make Triton compile variants (for
# values equal to 1 or divisible by 16) that the compile check never sees.
NOT_SPECIALIZED = ["seed", "tune_lq", "tune_lk"]

# Debug switch for tests: fill every kernel output with NaN before launch, so a position a kernel fails to write
# shows up instead of stale memory that happens to be right.
POISON_OUTPUTS = False


@triton.jit
def _rotate(x, cos, sin, INVERSE: tl.constexpr):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of an [M, D] tile by angles given as cos/sin [M, D/2]."""
    M: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    x0, x1 = tl.split(tl.reshape(x, [M, D // 2, 2]))
    if INVERSE:
        sin = -sin
    return tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), [M, D])


@triton.jit
def _load_tile(ptr, rows, offs_d, n_rows, head_dim, stride_row):
    """An [M, D] tile of a [rows, head_dim] matrix, zeros outside it."""
    return tl.load(ptr + rows[:, None] * stride_row + offs_d[None, :],
                   mask=(rows < n_rows)[:, None] & (offs_d < head_dim)[None, :], other=0.0)


@triton.jit
def _load_rotated(ptr, rows, offs_d, n_rows, head_dim, stride_row, COS, SIN, positions, ROPE: tl.constexpr):
    """Load an [M, D] tile (zeros outside), RoPE-rotated at `positions` when ROPE."""
    x = _load_tile(ptr, rows, offs_d, n_rows, head_dim, stride_row)
    if ROPE:
        half = tl.arange(0, x.shape[1] // 2)
        table = positions[:, None] * (head_dim // 2) + half[None, :]
        in_range = (rows < n_rows)[:, None] & (half < head_dim // 2)[None, :]
        cos = tl.load(COS + table, mask=in_range, other=0.0)
        sin = tl.load(SIN + table, mask=in_range, other=0.0)
        x = _rotate(x.to(tl.float32), cos, sin, False).to(x.dtype)
    return x


@triton.jit
def _rotate_back(x, rows, n_rows, head_dim, COS, SIN, positions):
    """Apply the inverse rotation R^T (the gradient of RoPE) to an fp32 [M, D] tile."""
    half = tl.arange(0, x.shape[1] // 2)
    table = positions[:, None] * (head_dim // 2) + half[None, :]
    in_range = (rows < n_rows)[:, None] & (half < head_dim // 2)[None, :]
    cos = tl.load(COS + table, mask=in_range, other=0.0)
    sin = tl.load(SIN + table, mask=in_range, other=0.0)
    return _rotate(x, cos, sin, True)


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, query_offset, qk_scale, window, max_distance,
            BIAS_LUT, KEY_MASK, stride_kmask, KEY_LIMIT, KEY_START, stride_klimit,
            HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_KEY_MASK: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, HAS_KEY_START: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_N] tile in log2 units, -inf where the key is not visible; also the clamped
    relative distance (key_pos - query_pos), which the backward needs for the bias gradient."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    rel = offs_n[None, :] - (offs_m + query_offset)[:, None]
    clamped = tl.minimum(tl.maximum(rel, -max_distance), max_distance)  # buckets are constant beyond
    if HAS_BIAS:
        s += tl.load(BIAS_LUT + h * (2 * max_distance + 1) + clamped + max_distance)
    visible = (offs_n < Lk)[None, :] & (offs_m < Lq)[:, None]
    if CAUSAL:
        visible &= rel <= 0
    if HAS_WINDOW:
        visible &= (rel <= window) & (rel >= -window)
    if HAS_KEY_MASK:
        visible &= (tl.load(KEY_MASK + b * stride_kmask + offs_n, mask=offs_n < Lk, other=0) != 0)[None, :]
    if HAS_KEY_LIMIT:
        limit = tl.load(KEY_LIMIT + b * stride_klimit + offs_m, mask=offs_m < Lq, other=0)
        visible &= offs_n[None, :] < limit[:, None]
    if HAS_KEY_START:
        start = tl.load(KEY_START + b * stride_klimit + offs_m, mask=offs_m < Lq, other=0)
        visible &= offs_n[None, :] >= start[:, None]
    return tl.where(visible, s, float("-inf")), clamped


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p):
    return tl.rand(seed + bh, offs_m[:, None] * Lk + offs_n[None, :]) >= dropout_p


@triton.jit
def _key_range(pid_m, b, Lq, Lk, query_offset, window, KEY_END, KEY_LIMIT, KEY_START, stride_klimit,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KEY_MASK: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, HAS_KEY_START: tl.constexpr):
    """[lo, hi) of key positions a query block can see; lo rounded down to a block boundary."""
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, Lq) - 1
    lo = 0
    hi = Lk
    if HAS_KEY_MASK:
        hi = tl.minimum(hi, tl.load(KEY_END + b))
    if CAUSAL:
        hi = tl.minimum(hi, last_row + query_offset + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_row + query_offset - window)
        if not CAUSAL:
            hi = tl.minimum(hi, last_row + query_offset + window + 1)
    if HAS_KEY_LIMIT:  # per-query limits grow with the query index, so the last row's is the block's maximum
        hi = tl.minimum(hi, tl.load(KEY_LIMIT + b * stride_klimit + last_row))
    if HAS_KEY_START:  # per-query starts grow with the query index too: the first row's is the block's minimum
        lo = tl.maximum(lo, tl.load(KEY_START + b * stride_klimit + first_row))
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, BIAS_LUT, KEY_MASK, KEY_END, KEY_LIMIT, KEY_START, QK_SCALE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, stride_kmask, stride_klimit,
    H, Lq, Lk, head_dim, query_offset, window, max_distance, seed, dropout_p, tune_lq, tune_lk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, HAS_KEY_START: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    q = _load_rotated(Q + b * sqb + h * sqh, offs_m, offs_d, Lq, head_dim, sqm, COS, SIN, offs_m + query_offset, ROPE)
    qk_scale = tl.load(QK_SCALE + b)  # log2(e) * scale, per sequence for log-n scaling

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m, b, Lq, Lk, query_offset, window, KEY_END, KEY_LIMIT, KEY_START, stride_klimit,
                        BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KEY_MASK, HAS_KEY_LIMIT, HAS_KEY_START)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(K, offs_n, offs_d, Lk, head_dim, skn, COS, SIN, offs_n, ROPE)
        v = _load_tile(V, offs_n, offs_d, Lk, head_dim, svn)
        s, rel = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, query_offset, qk_scale, window, max_distance,
                         BIAS_LUT, KEY_MASK, stride_kmask, KEY_LIMIT, KEY_START, stride_klimit,
                         HAS_BIAS, CAUSAL, HAS_WINDOW, HAS_KEY_MASK, HAS_KEY_LIMIT, HAS_KEY_START, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m < Lq)[:, None] & (offs_d < head_dim)[None, :])
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DTABLE, COS, SIN, BIAS_LUT, BUCKET_LUT, KEY_MASK, KEY_END, KEY_LIMIT,
    KEY_START, QUERY_START, QUERY_END, QK_SCALE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    stride_kmask, stride_klimit, stride_qstart,
    H, Lq, Lk, head_dim, query_offset, window, max_distance, num_buckets, key_grains, seed, dropout_p,
    tune_lq, tune_lk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BUCKETS_PAD: tl.constexpr,
    KEY_GRAIN: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, HAS_KEY_START: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_N % KEY_GRAIN == 0)  # the per-grain tables are indexed at the tile's first grain
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    k = _load_rotated(K + b * skb + h * skh, offs_n, offs_d, Lk, head_dim, skn, COS, SIN, offs_n, ROPE)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, Lk, head_dim, svn)
    qk_scale = tl.load(QK_SCALE + b)
    scale = qk_scale / 1.4426950408889634

    # Query rows [lo, hi) that can see some key of this block.
    first_key = pid_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, Lk) - 1
    lo = 0
    hi = Lq
    if HAS_KEY_MASK:
        hi = tl.where(first_key < tl.load(KEY_END + b), hi, 0)
    if CAUSAL:
        lo = tl.maximum(lo, first_key - query_offset)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_key - window - query_offset)
        hi = tl.minimum(hi, last_key + window + 1 - query_offset)
    if HAS_KEY_LIMIT:
        lo = tl.maximum(lo, tl.load(QUERY_START + b * stride_qstart + pid_n * (BLOCK_N // KEY_GRAIN)))
    if HAS_KEY_START:  # the rows whose visible keys start at or before this tile's last key
        last_grain = tl.minimum((pid_n + 1) * (BLOCK_N // KEY_GRAIN), key_grains) - 1
        hi = tl.minimum(hi, tl.load(QUERY_END + b * stride_qstart + last_grain))
    lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dtable = tl.zeros([BUCKETS_PAD], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rotated(Q, offs_m, offs_d, Lq, head_dim, sqm, COS, SIN, offs_m + query_offset, ROPE)
        do = _load_tile(DO, offs_m, offs_d, Lq, head_dim, sdom)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        s, rel = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, query_offset, qk_scale, window, max_distance,
                         BIAS_LUT, KEY_MASK, stride_kmask, KEY_LIMIT, KEY_START, stride_klimit,
                         HAS_BIAS, CAUSAL, HAS_WINDOW, HAS_KEY_MASK, HAS_KEY_LIMIT, HAS_KEY_START, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p)
            p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_dropped = p
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # d loss / d (unscaled-domain score)
        dk += tl.dot(tl.trans((ds * scale).to(q.dtype)), q, input_precision=PRECISION)
        if HAS_BIAS:
            bucket = tl.load(BUCKET_LUT + rel + max_distance)
            # One masked sum per bucket in the tile: a single one beyond max_distance, where buckets are constant.
            for target in range(tl.min(tl.min(bucket, 1), 0), tl.max(tl.max(bucket, 1), 0) + 1):
                total = tl.sum(tl.sum(tl.where(bucket == target, ds, 0.0), 1), 0)
                dtable += tl.where(tl.arange(0, BUCKETS_PAD) == target, total, 0.0)

    if ROPE:
        dk = _rotate_back(dk, offs_n, Lk, head_dim, COS, SIN, offs_n)
    store_mask = (offs_n < Lk)[:, None] & (offs_d < head_dim)[None, :]
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=store_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=store_mask)
    if HAS_BIAS:
        buckets = tl.arange(0, BUCKETS_PAD)
        tl.store(DTABLE + (bh * key_grains + pid_n) * num_buckets + buckets, dtable,
                 mask=buckets < num_buckets)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, BIAS_LUT, KEY_MASK, KEY_END, KEY_LIMIT, KEY_START, QK_SCALE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm, stride_kmask, stride_klimit,
    H, Lq, Lk, head_dim, query_offset, window, max_distance, seed, dropout_p, tune_lq, tune_lk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, HAS_KEY_START: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    q = _load_rotated(Q + b * sqb + h * sqh, offs_m, offs_d, Lq, head_dim, sqm, COS, SIN, offs_m + query_offset, ROPE)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, Lq, head_dim, sdom)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    qk_scale = tl.load(QK_SCALE + b)
    scale = qk_scale / 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m, b, Lq, Lk, query_offset, window, KEY_END, KEY_LIMIT, KEY_START, stride_klimit,
                        BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KEY_MASK, HAS_KEY_LIMIT, HAS_KEY_START)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(K, offs_n, offs_d, Lk, head_dim, skn, COS, SIN, offs_n, ROPE)
        v = _load_tile(V, offs_n, offs_d, Lk, head_dim, svn)
        s, rel = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, query_offset, qk_scale, window, max_distance,
                         BIAS_LUT, KEY_MASK, stride_kmask, KEY_LIMIT, KEY_START, stride_klimit,
                         HAS_BIAS, CAUSAL, HAS_WINDOW, HAS_KEY_MASK, HAS_KEY_LIMIT, HAS_KEY_START, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot((ds * scale).to(k.dtype), k, input_precision=PRECISION)

    if ROPE:
        dq = _rotate_back(dq, offs_m, Lq, head_dim, COS, SIN, offs_m + query_offset)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m < Lq)[:, None] & (offs_d < head_dim)[None, :])


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(KEEP, Lq, Lk, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, offs_m, offs_n, Lk, dropout_p)
        tl.store(KEEP + (bh * Lq + offs_m[:, None]) * Lk + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ----------------------------------------------------------------------------------------------------- host side
# `flash_attention` turns masks and positions into the kernels' small inputs, then calls the custom op
# suformer::flash_attention, whose autograd formula is suformer::flash_attention_backward: torch.compile sees one
# opaque node with a fake (shape-only) implementation instead of breaking its graph at a Triton launch.

_KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


def dropout_keep_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float, device) -> torch.Tensor:
    """The [B, H, Lq, Lk] bool mask of kept probabilities that the kernels draw for `dropout_seed=seed`."""
    B, H, Lq, Lk = shape
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    config = configs.KEEP_MASK_CONFIG
    _keep_mask_kernel[(triton.cdiv(Lq, config.kwargs["BLOCK_M"]), B * H)](
        keep, Lq, Lk, seed, dropout_p, **config.all_kwargs())
    return keep.bool()


@dataclass
class _Plan:
    """Everything but q/k/v and the bias table that the kernels read, built from the op's arguments (forward and
    backward alike)."""

    scale: torch.Tensor  # [B] fp32: log2(e) * scale (* log-n factor)
    table: Optional[torch.Tensor]  # the T5 bias table [num_buckets, H]
    max_distance: int
    bucket_lut: Optional[torch.Tensor]
    rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    key_mask: Optional[torch.Tensor]
    key_end: Optional[torch.Tensor]
    key_limit: Optional[torch.Tensor]
    key_start: Optional[torch.Tensor]
    causal: bool
    window: Optional[int]
    query_offset: int
    dropout_p: float
    seed: int
    block_d: int  # head dim padded to a power of two (>= 16, tl.dot's minimum)
    tune_lq: int  # the autotuning key's lengths: Lq and Lk rounded up to powers of two
    tune_lk: int
    arch: int  # configs.GPU_CONFIGS' architecture class; 0 on CPU
    tiles: Optional[dict[str, triton.Config]]  # per kernel; None: autotuned among configs.GPU_CONFIGS[arch]


@functools.lru_cache(maxsize=32)
def _bucket_lut(bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    distance = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).to(torch.int32)


@functools.lru_cache(maxsize=16)
def _rope_tables(positions: int, head_dim: int, base: float, device: torch.device):
    """cos/sin [positions, head_dim/2] (one per adjacent pair) in fp32, computed in float64; positions are rounded
    up by the caller so the cache is reused."""
    cos, sin = rotary_cos_sin(torch.arange(positions, device=device), head_dim, base, torch.float64)
    return cos[:, ::2].float().contiguous(), sin[:, ::2].float().contiguous()


def _arch(device: torch.device) -> int:
    """The candidates' architecture class on a GPU (configs.GPU_CONFIGS); 0 under the CPU interpreter."""
    return configs.arch_class(torch.cuda.get_device_capability(device)) if device.type == "cuda" else 0


def _launch_tiles(head_dim: int, dtype: torch.dtype, arch: int, block_sizes) -> Optional[dict[str, triton.Config]]:
    """Each kernel's explicit launch configuration, or None where a GPU autotunes among the candidates."""
    if not arch:
        chosen = {name: configs.CPU_CONFIG for name in configs.KERNELS}
    elif AUTOTUNE and block_sizes is None:
        return None  # (in float32 tuning skips the candidates whose tiles do not fit)
    elif dtype == torch.float32:  # ieee dots, twice the shared memory of the 16-bit tiles: a correctness path
        chosen = {name: configs.FP32_GPU_CONFIG for name in configs.KERNELS}
    else:
        chosen = {name: configs.candidates(name, head_dim, arch)[0] for name in configs.KERNELS}
    if block_sizes is not None:
        chosen = {name: configs.with_blocks(config, *block_sizes) for name, config in chosen.items()}
    return chosen


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, arch: int, head_dim_class: int):
    """`triton.autotune` over the compile-checked candidates, keyed by what changes the best tile: the length class,
    the head dim, the position scheme and masks (and, added by Triton, the tensors' dtypes). Configurations that
    fail to compile on the device are skipped by Triton; results are cached on disk across processes."""
    return triton.autotune(
        configs=configs.GPU_CONFIGS[arch][name][head_dim_class],
        key=["tune_lq", "tune_lk", "BLOCK_D", "HAS_BIAS", "ROPE", "CAUSAL", "HAS_WINDOW", "HAS_KEY_MASK",
             "HAS_KEY_LIMIT", "HAS_KEY_START", "DROPOUT"],
        # dK/dV writes one row of bias-table partials per key block: rows a larger tile leaves must stay zero.
        reset_to_zero=["DTABLE"] if name == "dkdv" else None,
        cache_results=True,
    )(_KERNELS[name])


def _launch(name: str, grid, plan: "_Plan", **args) -> None:
    """Launch kernel `name` with the plan's configuration, or autotuned; `grid` maps the tile sizes to the grid."""
    if plan.tiles is None:
        _autotuned(name, plan.arch, configs.head_dim_class(plan.block_d))[grid](**args)
    else:
        _KERNELS[name][grid](**args, **plan.tiles[name].all_kwargs())


def _new(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _new_like_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] output laid out as [B, L, H, D], so the model's merge of heads is a view, not a copy."""
    b, h, length, d = x.shape
    return _new((b, length, h, d), x).transpose(1, 2)


def _dummy(device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.int32, device=device)


def _or_dummy(tensor: Optional[torch.Tensor], device) -> torch.Tensor:
    return tensor if tensor is not None else _dummy(device)


def _launch_args(plan: _Plan, q: torch.Tensor, bias_lut: Optional[torch.Tensor]):
    dev = q.device
    cos, sin = plan.rope if plan.rope is not None else (_dummy(dev), _dummy(dev))
    return dict(
        COS=cos, SIN=sin, BIAS_LUT=_or_dummy(bias_lut, dev), KEY_MASK=_or_dummy(plan.key_mask, dev),
        KEY_END=_or_dummy(plan.key_end, dev), KEY_LIMIT=_or_dummy(plan.key_limit, dev),
        KEY_START=_or_dummy(plan.key_start, dev), QK_SCALE=plan.scale,
        stride_kmask=plan.key_mask.stride(0) if plan.key_mask is not None else 0,
        # key_limit and key_start are both [B, Lq] and contiguous
        stride_klimit=next((t.stride(0) for t in (plan.key_limit, plan.key_start) if t is not None), 0),
        query_offset=plan.query_offset, window=plan.window or 0, max_distance=plan.max_distance,
        seed=plan.seed, dropout_p=plan.dropout_p,
        HAS_BIAS=plan.table is not None, ROPE=plan.rope is not None, CAUSAL=plan.causal,
        HAS_WINDOW=plan.window is not None, HAS_KEY_MASK=plan.key_mask is not None,
        HAS_KEY_LIMIT=plan.key_limit is not None, HAS_KEY_START=plan.key_start is not None,
        DROPOUT=plan.dropout_p > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=plan.block_d, tune_lq=plan.tune_lq, tune_lk=plan.tune_lk,
    )


def _bias_lut(plan: _Plan) -> Optional[torch.Tensor]:
    """[heads, 2*max_distance+1] fp32: the table's bias at each clamped distance, pre-multiplied by log2(e)."""
    if plan.table is None:
        return None
    table = plan.table.detach().float()
    return (table[plan.bucket_lut.long()].t() * LOG2E).contiguous()


def _plan(q, k, table, scale, key_mask, key_end, key_limit, key_start, seed, bidirectional, max_distance,
          rotary_base, causal, window, query_offset, dropout_p, block_m, block_n) -> _Plan:
    """The op's arguments as the kernels take them: lookup tables, tiles, the dropout seed as an integer."""
    device, (_, _, Lq, D), Lk = q.device, q.shape, k.shape[2]
    rope = None
    if rotary_base is not None:
        positions_needed = max(Lq + query_offset, Lk)
        rope = _rope_tables(triton.cdiv(positions_needed, 1024) * 1024, D, float(rotary_base), device)
    arch = _arch(device)
    return _Plan(
        scale=scale, table=table, max_distance=max_distance if table is not None else 0,
        bucket_lut=_bucket_lut(bidirectional, table.shape[0], max_distance, device) if table is not None else None,
        rope=rope, key_mask=key_mask, key_end=key_end, key_limit=key_limit, key_start=key_start, causal=causal,
        window=window, query_offset=query_offset, dropout_p=dropout_p, seed=int(seed.item()) if dropout_p else 0,
        block_d=max(16, triton.next_power_of_2(D)), tune_lq=triton.next_power_of_2(Lq),
        tune_lk=triton.next_power_of_2(Lk), arch=arch,
        tiles=_launch_tiles(D, q.dtype, arch, (block_m, block_n) if block_m else None),
    )


@torch.library.custom_op("suformer::flash_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor],
                  scale: torch.Tensor, key_mask: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                  key_limit: Optional[torch.Tensor], key_start: Optional[torch.Tensor], seed: torch.Tensor,
                  bidirectional: bool, max_distance: int, rotary_base: Optional[float], causal: bool,
                  window: Optional[int], query_offset: int, dropout_p: float, block_m: int, block_n: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, Lq, D] laid out as [B, Lq, H, D], log-sum-exp [B, H, Lq] in log2 units)."""
    plan = _plan(q, k, table, scale, key_mask, key_end, key_limit, key_start, seed, bidirectional, max_distance,
                 rotary_base, causal, window, query_offset, dropout_p, block_m, block_n)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = _new_like_heads(q)
    lse = _new((B, H, Lq), q, torch.float32)
    _launch(
        "fwd", lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H), plan,
        Q=q, K=k, V=v, O=out, LSE=lse, **_launch_args(plan, q, _bias_lut(plan)),
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), skb=k.stride(0), skh=k.stride(1), skn=k.stride(2),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2),
        sob=out.stride(0), soh=out.stride(1), som=out.stride(2), H=H, Lq=Lq, Lk=Lk, head_dim=D,
    )
    return out, lse


@_attention_op.register_fake
def _(q, k, v, *args):
    B, H, Lq, _ = q.shape
    return _new_like_heads(q), q.new_empty((B, H, Lq), dtype=torch.float32)


def _query_bounds(plan: _Plan, B: int, Lk: int, device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per key grain (configs.KEY_GRAIN keys, the smallest key tile: autotuning picks the tile at launch): the first
    query row whose visible keys reach into it (key limits grow with the row) and the row after the last one
    whose visible keys start at or before its last key (key starts grow too)."""
    grain_firsts = torch.arange(0, Lk, configs.KEY_GRAIN, device=device, dtype=torch.int32).expand(B, -1)
    query_start = query_end = None
    if plan.key_limit is not None:
        query_start = torch.searchsorted(plan.key_limit, grain_firsts.contiguous(), right=True).to(torch.int32)
    if plan.key_start is not None:
        grain_lasts = (grain_firsts + configs.KEY_GRAIN).clamp(max=Lk) - 1
        query_end = torch.searchsorted(plan.key_start, grain_lasts.contiguous(), right=True).to(torch.int32)
    return query_start, query_end


@torch.library.custom_op("suformer::flash_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, table: Optional[torch.Tensor], scale: torch.Tensor,
                           key_mask: Optional[torch.Tensor], key_end: Optional[torch.Tensor],
                           key_limit: Optional[torch.Tensor], key_start: Optional[torch.Tensor],
                           seed: torch.Tensor, bidirectional: bool, max_distance: int, rotary_base: Optional[float],
                           causal: bool, window: Optional[int], query_offset: int, dropout_p: float, block_m: int,
                           block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d table): the table's gradient is empty when there is no table."""
    plan = _plan(q, k, table, scale, key_mask, key_end, key_limit, key_start, seed, bidirectional, max_distance,
                 rotary_base, causal, window, query_offset, dropout_p, block_m, block_n)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()  # rowsum(O * dO) = rowsum(P * dP)
    dq, dk, dv = _new_like_heads(q), _new_like_heads(k), _new_like_heads(v)
    args = _launch_args(plan, q, _bias_lut(plan))
    common = dict(
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), skb=k.stride(0), skh=k.stride(1), skn=k.stride(2),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2),
        sdob=grad_out.stride(0), sdoh=grad_out.stride(1), sdom=grad_out.stride(2),
        Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, H=H, Lq=Lq, Lk=Lk, head_dim=D,
    )
    grains = triton.cdiv(Lk, configs.KEY_GRAIN)
    num_buckets = table.shape[0] if table is not None else 1
    # zeros: tile pid_n writes row pid_n, rows from cdiv(Lk, BLOCK_N) on stay unwritten
    dtable_parts = torch.zeros((B * H, grains, num_buckets), dtype=torch.float32, device=q.device) \
        if table is not None else None
    query_start, query_end = _query_bounds(plan, B, Lk, q.device)
    _launch(
        "dkdv", lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H), plan,
        DK=dk, DV=dv, DTABLE=_or_dummy(dtable_parts, q.device), BUCKET_LUT=_or_dummy(plan.bucket_lut, q.device),
        QUERY_START=_or_dummy(query_start, q.device), QUERY_END=_or_dummy(query_end, q.device),
        stride_qstart=next((t.stride(0) for t in (query_start, query_end) if t is not None), 0),
        sdkb=dk.stride(0), sdkh=dk.stride(1), sdkn=dk.stride(2), sdvb=dv.stride(0), sdvh=dv.stride(1),
        sdvn=dv.stride(2), num_buckets=num_buckets, key_grains=grains,
        BUCKETS_PAD=triton.next_power_of_2(num_buckets), KEY_GRAIN=configs.KEY_GRAIN, **common, **args,
    )
    _launch(
        "dq", lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H), plan,
        DQ=dq, sdqb=dq.stride(0), sdqh=dq.stride(1), sdqm=dq.stride(2), **common, **args,
    )
    if dtable_parts is None:
        return dq, dk, dv, q.new_empty(0)
    return dq, dk, dv, dtable_parts.view(B, H, grains, num_buckets).sum(dim=(0, 2)).t().to(table.dtype)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, table, *args):
    dtable = table.new_empty(table.shape) if table is not None else q.new_empty(0)
    return _new_like_heads(q), _new_like_heads(k), _new_like_heads(v), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, table, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *(t if t is not None else _dummy(q.device) for t in options[:6]),
                          table if table is not None else _dummy(q.device))
    ctx.has = [t is not None for t in (*options[:6], table)]
    ctx.scalars = options[6:]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    scale, key_mask, key_end, key_limit, key_start, seed, table = (t if has else None for t, has in zip(saved, ctx.has))
    dq, dk, dv, dtable = _attention_backward_op(grad_out, q, k, v, out, lse, table, scale, key_mask, key_end,
                                                key_limit, key_start, seed, *ctx.scalars)
    return (dq, dk, dv, dtable if table is not None and ctx.needs_input_grad[3] else None) + (None,) * 15


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _visibility(key_padding, segment_ids, document_ids, Lq: int, Lk: int, query_offset: int, device):
    """The masks as the kernels read them: key_mask [B, Lk] int8 with key_end (last real key + 1) per row; per
    query [B, Lq] int32, the first visible key (key_start) and the one after the last (key_limit). UniLM limits a
    query to the keys whose segment cumsum is at most its own (a prefix); packed documents, each a contiguous run
    of equal ids, to its own document's run."""
    key_mask = key_end = key_limit = key_start = None
    if key_padding is not None:
        key_mask = key_padding.to(device=device, dtype=torch.int8).contiguous()
        positions = torch.arange(1, Lk + 1, device=device, dtype=torch.int32)
        key_end = (key_mask.to(torch.int32) * positions).amax(dim=1).to(torch.int32)
    if segment_ids is not None:
        cumulative = segment_ids.to(device=device, dtype=torch.int32).cumsum(dim=1).to(torch.int32)
        query_cumulative = cumulative[:, query_offset: query_offset + Lq].contiguous()
        key_limit = torch.searchsorted(cumulative.contiguous(), query_cumulative, right=True).to(torch.int32)
    if document_ids is not None:
        runs = document_runs(document_ids.to(device)).contiguous()
        query_runs = runs[:, query_offset: query_offset + Lq].contiguous()
        key_start = torch.searchsorted(runs, query_runs, right=False).to(torch.int32)
        run_limit = torch.searchsorted(runs, query_runs, right=True).to(torch.int32)
        key_limit = run_limit if key_limit is None else torch.minimum(key_limit, run_limit)
    return key_mask, key_end, key_limit, key_start


def _check(q, k, v, rotary_base, dropout_p, block_sizes) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B,H,Lq,D] and k, v [B,H,Lk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.is_cuda and q.shape[3] > configs.MAX_HEAD_DIM:
        raise ValueError(f"the fused kernels support head dims up to {configs.MAX_HEAD_DIM}, got {q.shape[3]}")
    if block_sizes is not None and any(size % configs.KEY_GRAIN for size in block_sizes):
        raise ValueError(f"block sizes must be multiples of {configs.KEY_GRAIN}, got {block_sizes}")
    if rotary_base is not None and q.shape[3] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {q.shape[3]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: Optional[T5RelativeBias] = None,
    rotary_base: Optional[float] = None,
    key_padding: Optional[torch.Tensor] = None,
    causal: bool = False,
    segment_ids: Optional[torch.Tensor] = None,
    document_ids: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    query_offset: int = 0,
    logn_base: Optional[int] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    block_sizes: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + T5 bias, masked) v for q [B, H, Lq, D], k/v [B, H, Lk, D], fused in Triton.

    Query i sits at position `query_offset + i`, key j at j. `key_padding` [B, Lk] is True for real keys;
    `segment_ids` [B, Lk] are UniLM segments (source 0 bidirectional, target 1 causal); `document_ids` [B, Lk] the
    documents packed into a row, each a contiguous run (a query sees its own document only); `window` limits
    |query - key| (left side only when causal). `logn_base` multiplies the scale by log(n)/log(logn_base), n the
    sequence's number of real keys (Su's entropy-invariant attention). Rows with no visible key return zeros.
    Dropout draws its seed from torch's generator unless `dropout_seed` is given (see `dropout_keep_mask`).
    """
    _check(q, k, v, rotary_base, dropout_p, block_sizes)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, Lq, _ = q.shape
    if bias is not None and (bias.table.dim() != 2 or bias.table.shape[1] != H):
        raise ValueError(f"bias table must be [num_buckets, {H}], got {tuple(bias.table.shape)}")
    masks = _visibility(key_padding, segment_ids, document_ids, Lq, k.shape[2], query_offset, q.device)
    row_scale = torch.full((B,), scale * LOG2E, dtype=torch.float32, device=q.device)
    if logn_base is not None:
        row_scale = row_scale * logn_factor(key_padding, B, k.shape[2], logn_base, q.device).float()
    # A tensor, so that it is drawn inside a compiled graph too, and again by an activation checkpoint's replay.
    seed = torch.randint(0, 2**31 - 1, (1,)) if dropout_seed is None else torch.tensor([int(dropout_seed)])
    out, _ = _attention_op(
        q, k, v, bias.table if bias is not None else None, row_scale, *masks, seed,
        bias.bidirectional if bias is not None else True, bias.max_distance if bias is not None else 0,
        None if rotary_base is None else float(rotary_base), causal, window, query_offset, float(dropout_p),
        *(block_sizes or (0, 0)))
    return out
