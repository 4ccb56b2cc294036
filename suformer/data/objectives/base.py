"""What every pretraining objective provides (one module each, registered in `objectives/__init__.py`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import pyarrow as pa

if TYPE_CHECKING:
    import torch

    from ...config import DataSection
    from ...tokenizer import Tokenizer

IGNORE = -100  # label of positions the loss does not read (PyTorch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Objective:
    name: str
    family: str  # the model family it trains
    pre_tokenize: Optional[str]  # the tokenizer's pre-tokenisation: "jieba" (word-level) or None (char-level)
    schema: pa.Schema  # of its Parquet examples; every objective has input_ids and num_tokens
    # (document, data settings, tokenizer) -> example rows: a pure function, so examples do not depend on how
    # the work is split
    examples: Callable[[str, "DataSection", "Tokenizer"], list[dict]]
    # Whether a document can make an example, without a tokenizer (the preflight's check); why not, as a sentence
    makes_examples: Callable[[str, "DataSection"], bool]
    no_example_reason: Callable[["DataSection"], str]
    collate: Callable[[list[dict]], dict]  # rows -> padded model inputs and labels
    longest: Callable[["DataSection"], int]  # the longest example's input length, in tokens

    @property
    def vocab_words(self) -> bool:
        """A vocab built for a word-level objective holds words as well as characters."""
        return self.pre_tokenize == "jieba"


def pad(rows: list, value: int) -> "torch.Tensor":
    """Rows of ids -> one [len(rows), longest] long tensor, right-padded with `value`."""
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
