"""The ways the attention kernels are called: position scheme and masks, as the models (and users) call them.

The compile check compiles every kernel for each profile; the first GPU run autotunes and times them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..positions import T5RelativeBias


@dataclass(frozen=True)
class Profile:
    """A position scheme and mask set (training: dropout on)."""

    name: str
    model: bool = False  # a profile the shipped models run in training: must compile without spills at head dim 64
    bias: bool = False
    bidirectional: bool = True
    rope: bool = False
    padding: bool = False
    causal: bool = False
    unilm: bool = False
    window: bool = False
    logn: bool = False
    packed: bool = False  # documents packed into each row (document masking)
    dropout: bool = False
    query_fraction: float = 1.0  # cross attention: decoder length over encoder length

    def inputs(self, batch: int, heads: int, length: int, head_dim: int, dtype, device, generator=None):
        """q, k, v (requiring grad) and flash_attention's keyword arguments for this profile; a fifth of the second
        sequence is padding, the first third of every sequence is the UniLM source, packed documents are runs of
        a seventh of the length."""
        lq = max(1, round(length * self.query_fraction))

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

        q, k, v = randn(batch, heads, lq, head_dim), randn(batch, heads, length, head_dim), \
            randn(batch, heads, length, head_dim)
        padding = torch.ones(batch, length, dtype=torch.bool)
        padding[-1, length * 4 // 5:] = False
        segments = (torch.arange(length) >= length // 3).long().expand(batch, -1)
        documents = (torch.arange(length) // max(1, length // 7) + 1).expand(batch, -1)
        table = torch.randn(32, heads, generator=generator).to(device).requires_grad_()
        kwargs = dict(
            scale=head_dim ** -0.5,
            bias=T5RelativeBias(table, self.bidirectional, 128) if self.bias else None,
            rotary_base=10000.0 if self.rope else None,
            key_padding=padding.to(device) if self.padding else None, causal=self.causal,
            segment_ids=segments.to(device) if self.unilm else None, window=64 if self.window else None,
            document_ids=documents.to(device) if self.packed else None,
            logn_base=512 if self.logn else None, dropout_p=0.1 if self.dropout else 0.0,
        )
        return q, k, v, kwargs


PROFILES = {p.name: p for p in [
    Profile("plain"),
    Profile("t5-encoder", model=True, bias=True, padding=True, dropout=True),
    Profile("t5-decoder", model=True, bias=True, bidirectional=False, padding=True, causal=True, dropout=True),
    # bert4keras mode: cross attention reads the decoder's bias too; a decoder length that is no multiple of 16
    Profile("t5-cross", model=True, bias=True, bidirectional=False, padding=True, dropout=True, query_fraction=0.2),
    Profile("roformer-mlm", model=True, rope=True, padding=True, dropout=True),
    Profile("roformer-unilm", model=True, rope=True, padding=True, unilm=True, dropout=True),
    Profile("roformer-mlm-packed", model=True, rope=True, padding=True, packed=True, dropout=True),
    Profile("rope-window-logn-causal", rope=True, causal=True, window=True, logn=True),
    Profile("everything", bias=True, rope=True, padding=True, causal=True, unilm=True, window=True, logn=True,
            dropout=True),
]}
