"""Which keys each query may see, described by small inputs rather than an [Lq, Lk] tensor.

Backends that can compute visibility themselves (SDPA's causal flag, the Triton kernels) read the fields; the
others ask for the dense mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, from small inputs; every field optional and combined with AND.

    key_padding: [B, Lk] bool, True for real tokens.
    causal: keys at positions <= the query's.
    segment_ids: [B, Lk] UniLM segments (0 source, 1 target): source is bidirectional, target causal.
    window: keys within `window` positions of the query (on the left only when causal).
    document_ids: [B, Lk] ids of the documents packed into each row, each a contiguous run: keys in the query's
        own document only (document masking).
    """

    key_padding: Optional[torch.Tensor] = None
    causal: bool = False
    segment_ids: Optional[torch.Tensor] = None
    window: Optional[int] = None
    document_ids: Optional[torch.Tensor] = None

    def is_empty(self) -> bool:
        return (self.key_padding is None and not self.causal and self.segment_ids is None and self.window is None
                and self.document_ids is None)

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
        if self.document_ids is not None:
            runs = document_runs(self.document_ids)
            query_runs = runs[:, query_offset : query_offset + query_len]
            combine((query_runs[:, :, None] == runs[:, None, :])[:, None])
        if self.key_padding is not None:
            combine(self.key_padding.bool()[:, None, None, :])
        return allowed


def logn_factor(key_padding: Optional[torch.Tensor], batch: int, key_len: int, logn_base: int, device) -> torch.Tensor:
    """[B] multiplier log(n)/log(base) of entropy-invariant attention, n = real keys per sequence."""
    if key_padding is not None:
        real_keys = key_padding.sum(dim=1).clamp(min=1).double()
    else:
        real_keys = torch.full((batch,), float(key_len), dtype=torch.float64, device=device)
    return real_keys.log() / math.log(logn_base)


def document_runs(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] int32 number of each position's run of equal document ids: a packed document is a contiguous run
    (the same id further on is another document), which is what every backend masks by."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts.cumsum(dim=1, dtype=torch.int32)
