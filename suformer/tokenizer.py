"""BERT WordPiece tokenizer with T5 PEGASUS' jieba pre-tokenisation (bert4keras' algorithm), and a vocab builder.

T5 PEGASUS: Tokenizer(vocab, pre_tokenize="jieba"): lowercase + NFD + drop combining marks on the whole text,
jieba's `cut(HMM=False)` (computed by jieba-rs: `jieba_words`), keep words that are in the vocab whole, send the rest
through the basic tokenizer (split around punctuation and CJK characters, drop control characters) and WordPiece.
RoFormerV2: Tokenizer(vocab, pre_tokenize=None): the same without jieba (a char-level vocab).
Sequences are `[CLS] ... [SEP]`; truncation pops tokens from the right and keeps `[SEP]`.
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import rjieba

from .storage import Location

SPECIAL_TOKENS = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
_CJK_PUNCTUATION = (
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d\uff0f\uff1a\uff1b\uff1c\uff1d\uff1e"
    "\uff20\uff3b\uff3c\uff3d\uff3e\uff3f\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60\uff62\uff63\uff64\u3000\u3001"
    "\u3003\u3008\u3009\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011\u3014\u3015\u3016\u3017\u3018\u3019\u301a"
    "\u301b\u301c\u301d\u301e\u301f\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c\u201d\u201e\u201f\u2026"
    "\u2027\ufe4f\ufe51\ufe54\u00b7\uff01\uff1f\uff61\u3002"
)
_DECODE_NO_SPACE_AFTER = re.compile("(%s) " % "|".join(re.escape(p) for p in _CJK_PUNCTUATION + "+-/={(<["))

# What the basic tokenizer does with a character.
_KEEP, _ALONE, _SPACE, _DROP = 0, 1, 2, 3


def jieba_words(text: str) -> list[str]:
    """jieba.cut(text, HMM=False), computed by jieba-rs (rjieba, as transformers' RoFormer tokenizer does): the same
    dictionary and the same maximum-probability route over the same word graph, 14x faster than jieba's Python,
    which took two thirds of the PEGASUS data stage. tests/test_tokenizer.py checks it word for word against jieba."""
    return rjieba.cut(text, False)


@lru_cache(maxsize=None)
def _combining_marks() -> dict[int, None]:
    """A str.translate table deleting every character of category Mn (1,950 code points; built once, 60 ms)."""
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Mn"}


def normalize(text: str) -> str:
    """bert4keras' lowercase_and_normalize: lower(), NFD, drop combining marks (category Mn)."""
    return unicodedata.normalize("NFD", text.lower()).translate(_combining_marks())


def is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F or 0x2B740 <= code <= 0x2B81F or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F
    )


def is_punctuation(ch: str) -> bool:
    code = ord(ch)
    return (
        33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
        or unicodedata.category(ch).startswith("P")
    )


@lru_cache(maxsize=None)
def _char_class(ch: str) -> int:
    if is_punctuation(ch) or is_cjk(ch):
        return _ALONE
    if ch in " \n\r\t" or unicodedata.category(ch) == "Zs":
        return _SPACE
    if ch in "\x00\ufffd" or unicodedata.category(ch) in ("Cc", "Cf"):
        return _DROP
    return _KEEP


def basic_split(text: str) -> list[str]:
    """Whitespace-split words, with every punctuation and CJK character a word of its own, controls dropped."""
    words, current = [], []
    for ch in text:
        kind = _char_class(ch)
        if kind == _KEEP:
            current.append(ch)
            continue
        if current:
            words.append("".join(current))
            current = []
        if kind == _ALONE:
            words.append(ch)
    if current:
        words.append("".join(current))
    return words


def load_vocab(path) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number. Duplicate tokens are an error (they shift ids)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            token = line.strip()
            if token in vocab:
                raise ValueError(f"{path}: line {line_no + 1}: duplicate token {token!r} (first on line {vocab[token] + 1})")
            vocab[token] = line_no
    for required in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if required not in vocab:
            raise ValueError(f"{path}: vocab has no {required} token")
    return vocab


class Tokenizer:
    def __init__(self, vocab_path, pre_tokenize: Optional[str] = "jieba", lowercase: bool = True, word_maxlen: int = 200):
        if pre_tokenize not in ("jieba", None):
            raise ValueError(f"pre_tokenize must be 'jieba' or None, got {pre_tokenize!r}")
        self.vocab_path = str(vocab_path)
        self.vocab = load_vocab(vocab_path)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.pre_tokenize, self.lowercase, self.word_maxlen = pre_tokenize, lowercase, word_maxlen
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.mask_id = self.vocab.get("[MASK]")
        self._word_cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    # -- text -> tokens -------------------------------------------------------------------------------------------
    def _wordpiece(self, word: str) -> tuple[str, ...]:
        """Greedy longest-match-first; an unsegmentable or over-long word stays whole (-> [UNK])."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        if len(word) > self.word_maxlen:
            pieces = [word]
        else:
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [word]
                    break
                pieces.append(piece)
                start = end
        result = tuple(pieces)
        if len(self._word_cache) < 1_000_000:
            self._word_cache[word] = result
        return result

    def _basic_tokens(self, text: str) -> list[str]:
        tokens: list[str] = []
        for word in basic_split(text):
            tokens.extend(self._wordpiece(word))
        return tokens

    def tokenize(self, text: str, maxlen: Optional[int] = None) -> list[str]:
        """`[CLS] tokens [SEP]`, truncated to `maxlen` tokens from the right (keeping `[SEP]`)."""
        if self.lowercase:
            text = normalize(text)
        if self.pre_tokenize == "jieba":
            tokens = []
            for word in jieba_words(text):
                if word in self.vocab:
                    tokens.append(word)
                else:
                    tokens.extend(self._basic_tokens(word))
        else:
            tokens = self._basic_tokens(text)
        if maxlen is not None:
            if maxlen < 2:
                raise ValueError(f"maxlen must be >= 2 to hold [CLS] and [SEP], got {maxlen}")
            tokens = tokens[: maxlen - 2]
        return ["[CLS]", *tokens, "[SEP]"]

    def tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        vocab, unk = self.vocab, self.unk_id
        return [vocab.get(t, unk) for t in tokens]

    def encode(self, text: str, maxlen: Optional[int] = None) -> list[int]:
        return self.tokens_to_ids(self.tokenize(text, maxlen))

    def encode_pair(self, first: str, second: str, maxlen: Optional[int] = None) -> tuple[list[int], list[int]]:
        """`[CLS] first [SEP] second [SEP]` with segment ids 0/1; truncation pops from the longer part's end."""
        a = self.encode(first)
        b = self.encode(second)[1:]
        if maxlen is not None:
            while len(a) + len(b) > maxlen:
                longer = a if len(a) >= len(b) else b
                if len(longer) <= 2:
                    raise ValueError(f"maxlen {maxlen} is too small for a pair")
                longer.pop(-2)
        return a + b, [0] * len(a) + [1] * len(b)

    def encode_batch(self, texts: Iterable[str], maxlen: Optional[int] = None) -> list[list[int]]:
        return [self.encode(t, maxlen) for t in texts]

    # -- ids -> text ----------------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> str:
        """Join tokens the bert4keras way: no spaces between CJK, spaces between Latin words, specials dropped."""
        tokens = [self.id_to_token.get(int(i), "[UNK]") for i in ids]
        tokens = [t for t in tokens if not (t[:1] == "[" and t[-1:] == "]")]
        text = ""
        for i, token in enumerate(tokens):
            if token[:2] == "##":
                text += token[2:]
            elif len(token) == 1 and (is_cjk(token) or is_punctuation(token)):
                text += token + (" " if is_punctuation(token) else "")
            elif i > 0 and text and is_cjk(text[-1]):
                text += token
            else:
                text += " " + token
        text = re.sub(" +", " ", text)
        text = re.sub("' (re|m|s|t|ve|d|ll) ", r"'\1 ", text)
        text = _DECODE_NO_SPACE_AFTER.sub(r"\1", text)
        text = re.sub(r"(\d\.) (\d)", r"\1\2", text)
        return text.strip()

    # -- files ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ordered = sorted(self.vocab, key=self.vocab.get)
        (path / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
        config = {"pre_tokenize": self.pre_tokenize, "lowercase": self.lowercase, "word_maxlen": self.word_maxlen}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "Tokenizer":
        """A directory with vocab.txt (+ tokenizer_config.json when saved by suformer; else jieba mode)."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        known = {k: config[k] for k in ("pre_tokenize", "lowercase", "word_maxlen") if k in config}
        return cls(path / "vocab.txt", **{**known, **overrides})


def count_vocab_tokens(texts: Iterable[str], *, words: bool = True, lowercase: bool = True) -> tuple[Counter, Counter]:
    """(single characters, multi-character tokens) counted over `texts`: the input of `vocab_from_counts`, so
    that counts made on many machines can be added up before ranking."""
    chars: Counter = Counter()
    multi: Counter = Counter()
    for text in texts:
        text = normalize(text) if lowercase else text
        for piece in basic_split(text):
            chars.update(piece)
            if len(piece) > 1:
                multi[piece] += 1
        if words:
            for word in jieba_words(text):
                if len(word) > 1 and all(is_cjk(ch) for ch in word):
                    multi[word] += 1
    return chars, multi


def vocab_from_counts(chars: dict[str, int], multi: dict[str, int], vocab_size: int,
                      min_char_count: int = 1) -> list[str]:
    """The 106 BERT specials, single characters (and `##` continuations for non-CJK ones, so any Latin word can
    be spelled), then the most frequent multi-character tokens until `vocab_size`. Ties rank by the token itself,
    so the vocab does not depend on the order the counts arrived in."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)

    def add(token: str) -> None:
        if token not in seen and len(vocab) < vocab_size:
            seen.add(token)
            vocab.append(token)

    def ranked(counts: dict[str, int]) -> list[str]:
        return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]

    ranked_chars = [ch for ch in ranked(chars) if chars[ch] >= min_char_count]
    for ch in ranked_chars:
        add(ch)
    for ch in ranked_chars:
        if not is_cjk(ch) and not is_punctuation(ch):
            add("##" + ch)
    for word in ranked(multi):
        add(word)
    return vocab


def build_vocab(
    texts: Iterable[str], vocab_size: int, *, words: bool = True, min_char_count: int = 1, lowercase: bool = True
) -> list[str]:
    """A T5-PEGASUS-style vocab from `texts`: characters, then jieba words (when `words`) and Latin/number words.
    `words=False` gives a char-level vocab like RoFormerV2's."""
    chars, multi = count_vocab_tokens(texts, words=words, lowercase=lowercase)
    return vocab_from_counts(chars, multi, vocab_size, min_char_count)


def write_vocab(tokens: list[str], path) -> None:
    """One token per line, to a local path or URI (whole or not at all)."""
    Location.of(path).write_text("\n".join(tokens) + "\n")

