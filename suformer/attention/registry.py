"""The attention entry point and the backends it dispatches to, by name.

The reference and SDPA backends (backends.py) are there from the start; the Triton kernels
(suformer.attention.triton) are imported and added on first use, so importing the models never imports triton.
`register_backend` adds one of your own.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

import torch

from .backends import BACKENDS as TORCH_BACKENDS
from .masks import AttentionMask
from .positions import PositionScheme

Backend = Callable[..., torch.Tensor]
_BACKENDS: dict[str, Backend] = dict(TORCH_BACKENDS)


def register_backend(name: str, fn: Backend) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


# A path search, once: not per attention call, nor inside a graph torch.compile traces.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _backend(name: str, q: torch.Tensor) -> Backend:
    """Look a backend up; "auto" is the Triton kernels on CUDA (when triton is installed), SDPA elsewhere."""
    if name == "auto":
        name = "triton" if q.is_cuda and TRITON_INSTALLED else "sdpa"
    if name not in _BACKENDS and name.startswith("triton"):
        _BACKENDS.update(importlib.import_module("suformer.attention.triton").BACKENDS)
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
