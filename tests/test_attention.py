"""The attention entry point: SDPA against the float64 reference; buckets and RoPE against independent code."""
import math

import pytest
import torch

from suformer.attention import (
    AttentionMask, Rotary, T5RelativeBias, apply_rotary, attention, relative_position_bucket, rotary_cos_sin,
)

from numerics import rel_err


@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-600, 600)[None, :] - torch.arange(0, 300)[:, None]
    ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, theirs)
    assert ours.min() == 0 and ours.max() == 31


def test_cross_attention_bucket_is_max_i_minus_j():
    """bert4keras' cross bias: decoder query i, encoder key j -> unidirectional bucket of max(i - j, 0)."""
    i, j = torch.arange(200)[:, None], torch.arange(300)[None, :]
    buckets = relative_position_bucket(j - i, bidirectional=False)
    n = (i - j).clamp(min=0)
    expected = torch.where(n < 16, n, (16 + (torch.log(n.clamp(min=1) / 16.0) / math.log(8) * 16).long()).clamp(max=31))
    assert torch.equal(buckets, expected)
    assert (buckets[j.expand(200, 300) >= i.expand(200, 300)] == 0).all()


def test_rotary_rotates_adjacent_pairs():
    """Each pair (x[2i], x[2i+1]) at position p is rotated by p * 10000^(-2i/d), checked one scalar at a time."""
    L, D = 7, 8
    x = torch.randn(L, D, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(L), D, dtype=torch.float64)
    out = apply_rotary(x, cos, sin)
    for p in range(L):
        for i in range(D // 2):
            theta = p * 10000 ** (-2 * i / D)
            a, b = x[p, 2 * i].item(), x[p, 2 * i + 1].item()
            assert out[p, 2 * i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-12)
            assert out[p, 2 * i + 1].item() == pytest.approx(b * math.cos(theta) + a * math.sin(theta), abs=1e-12)


def test_rotary_matches_transformers_roformer():
    from transformers.models.roformer.modeling_roformer import RoFormerSelfAttention, RoFormerSinusoidalPositionalEmbedding

    B, H, L, D = 2, 3, 11, 16
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    table = RoFormerSinusoidalPositionalEmbedding(64, D)
    table.weight.data = table.create_weight() if hasattr(table, "create_weight") else table.weight.data
    sinusoidal = table(torch.Size([B, L]))[None, None]
    hq, hk = RoFormerSelfAttention.apply_rotary_position_embeddings(sinusoidal, q, k)
    cos, sin = rotary_cos_sin(torch.arange(L), D)
    assert rel_err(apply_rotary(q, cos, sin), hq) < 1e-6
    assert rel_err(apply_rotary(k, cos, sin), hk) < 1e-6


def _unilm_allowed(seg):
    """bert4keras UniLM_Mask by loops: key j visible to query i iff cumsum(seg)[j] <= cumsum(seg)[i]."""
    B, L = seg.shape
    cum = seg.cumsum(1)
    return torch.tensor([[[cum[b, j] <= cum[b, i] for j in range(L)] for i in range(L)] for b in range(B)])


def test_unilm_mask_source_bidirectional_target_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    dense = AttentionMask(segment_ids=seg).dense(7, 7, 0, "cpu")[:, 0]
    assert torch.equal(dense, _unilm_allowed(seg))
    # Source rows see exactly the source; target row t sees the source and targets up to t.
    assert dense[1, 0].tolist() == [True, True, False, False, False, False, False]
    assert dense[1, 3].tolist() == [True, True, True, True, False, False, False]


CASES = {
    "t5_encoder_padded": dict(pos="t5_bi", mask=dict(padding=True)),
    "t5_decoder_causal_padded": dict(pos="t5_uni", mask=dict(padding=True, causal=True)),
    "t5_cross_different_lengths": dict(pos="t5_uni", mask=dict(padding=True), lk=37),
    "t5_decode_step_with_offset": dict(pos="t5_uni", mask=dict(causal=True), lq=1, offset=29),
    "rope_padded": dict(pos="rope", mask=dict(padding=True), scale=0.25),
    "rope_unilm": dict(pos="rope", mask=dict(padding=True, unilm=True), scale=0.25),
    "rope_causal_no_padding": dict(pos="rope", mask=dict(causal=True), scale=0.25),
    "none_sliding_window": dict(pos=None, mask=dict(window=5, causal=True)),
    "none_bidirectional_window_padded": dict(pos=None, mask=dict(window=4, padding=True)),
    "fully_masked_row": dict(pos="t5_bi", mask=dict(padding=True, empty_row=True)),
    "rope_logn_padded": dict(pos="rope", mask=dict(padding=True), scale=0.25, logn_base=16),
}


def _make_case(case, dtype):
    B, H, D = 3, 4, 16
    lq = case.get("lq", 30)
    lk = case.get("lk", lq + case.get("offset", 0))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, lk, D, generator=g, dtype=dtype)
    table = torch.randn(32, H, generator=g, dtype=dtype)
    m = case["mask"]
    padding = None
    if m.get("padding"):
        lengths = torch.tensor([lk, lk - 7, 3])
        if m.get("empty_row"):
            lengths[2] = 0
        padding = torch.arange(lk)[None, :] < lengths[:, None]
    segments = None
    if m.get("unilm"):
        segments = (torch.arange(lk)[None, :] >= torch.tensor([10, 4, 2])[:, None]).long() * (padding.long())
    mask = AttentionMask(padding, m.get("causal", False), segments, m.get("window"))
    return q, k, v, table, mask


def _position(case, table):
    pos = case["pos"]
    if pos == "rope":
        return Rotary()
    if pos:
        return T5RelativeBias(table, bidirectional=pos == "t5_bi")
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_sdpa_matches_float64_reference(name):
    case = CASES[name]
    kwargs = dict(scale=case.get("scale", 1.0), query_offset=case.get("offset", 0), logn_base=case.get("logn_base"))
    q, k, v, table, mask = _make_case(case, torch.float64)
    tensors = [t.clone().requires_grad_() for t in (q, k, v, table)]
    expected = attention(*tensors[:3], position=_position(case, tensors[3]), mask=mask, backend="reference", **kwargs)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), tensors, allow_unused=True)

    tensors32 = [t.detach().float().requires_grad_() for t in tensors]
    out = attention(*tensors32[:3], position=_position(case, tensors32[3]), mask=mask, backend="sdpa", **kwargs)
    grads = torch.autograd.grad(out.pow(2).sum(), tensors32, allow_unused=True)

    assert torch.isfinite(out).all()
    assert rel_err(out.double(), expected) < 1e-5
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got.double(), want) < 1e-5
    if case["mask"].get("empty_row"):
        assert (out[2] == 0).all() and (expected[2] == 0).all()


def test_reference_is_plain_softmax_attention():
    """Sanity of the ground truth itself: no mask, no positions -> softmax(q k^T s) v written out by hand."""
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * 0.5
    expected = torch.einsum("bhij,bhjd->bhid", scores.exp() / scores.exp().sum(-1, keepdim=True), v)
    assert rel_err(attention(q, k, v, scale=0.5, backend="reference"), expected) < 1e-12


def test_logn_scaling_uses_each_sequences_real_length():
    """Entropy-invariant attention: scores scaled by log(n)/log(base), n = that sequence's number of real keys."""
    q, k, v = (torch.randn(2, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = attention(q, k, v, scale=0.5, mask=AttentionMask(key_padding=padding), logn_base=8, backend="reference")
    for b, n in enumerate([6, 4]):
        scores = q[b, 0] @ k[b, 0, :n].T * 0.5 * math.log(n) / math.log(8)
        assert rel_err(out[b, 0], torch.softmax(scores, -1) @ v[b, 0, :n]) < 1e-12


def test_unknown_backend_is_named():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, q, q, backend="nope")
