"""What every pretraining objective provides (one module each, registered in `objectives/__init__.py`).

`data` below is the config's DataSection; it is typed `Any` because the config imports the objectives (to check
that one fits the model family), not the other way round."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import pyarrow as pa

if TYPE_CHECKING:
    from ....tokenizer import Tokenizer


@dataclass(frozen=True)
class Objective:
    name: str
    family: str  # the model family it trains
    pre_tokenize: Optional[str]  # the tokenizer's pre-tokenisation: "jieba" (word-level) or None (char-level)
    schema: pa.Schema  # of its Parquet examples; every objective has input_ids and num_tokens
    # (document, data, tokenizer) -> example rows: a pure function, so examples do not depend on how
    # the work is split
    examples: Callable[[str, Any, "Tokenizer"], list[dict]]
    # Whether a document can make an example, without a tokenizer (the preflight's check); why not, as a sentence
    makes_examples: Callable[[str, Any], bool]
    no_example_reason: Callable[[Any], str]
    collate: Callable[[list[dict]], dict]  # rows -> padded model inputs and labels
    longest: Callable[[Any], int]  # the longest example's input length, in tokens
    # train.batching=auto: "packed" (whole examples share rows of `longest` tokens, each attending to itself) or
    # "grouped" (micro-batches of similar lengths)
    batching: str = "grouped"
    # Whether examples can be packed: their rows concatenate field by field and the model masks attention by
    # document_ids (not an encoder-decoder, whose cross-attention would mix them)
    packs: bool = False
    # An example row's padded lengths, the input's first (num_tokens), e.g. an encoder-decoder's target second:
    # what grouped batching sorts by
    lengths: Callable[[dict], tuple[int, ...]] = lambda row: (row["num_tokens"],)

    @property
    def vocab_words(self) -> bool:
        """A vocab built for a word-level objective holds words as well as characters."""
        return self.pre_tokenize == "jieba"
