"""The KV cache of incremental decoding. It sits beside the position schemes and masks because a cached step's
queries are placed by them at `query_offset = cache.length`, after the keys already cached at positions 0..n-1."""
from __future__ import annotations

from typing import Optional

import torch


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

    def layer(self, index: int) -> "LayerKV":
        """Layer `index`'s entries, which is what a layer is handed (it does not need to know its number)."""
        return LayerKV(self, index)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (beam search)."""
        for store in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(store):
                if kv is not None:
                    store[i] = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))


class LayerKV:
    """One layer's view of a KVCache."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.extend(self.index, k, v)

    @property
    def cross(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self.cache.cross_kv[self.index]

    @cross.setter
    def cross(self, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cache.cross_kv[self.index] = kv
