"""Data-pipeline benchmark on one CPU core: pseudo-summary speed against the published algorithm, and documents/s
and tokens/s of each objective (objective + tokenisation, what one Ray Data worker does).

    pip install -e ".[bench]" && python benchmarks/data_pipeline.py [--docs 3000]

Baseline for the pseudo-summary: t5-pegasus train.py's `pseudo_summary`, literally, with its C++ LCS (`pylcs.lcs`),
timed on the same chunks of People's Daily in the same run. Outputs are checked equal before timing counts.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time

from suformer.config import DataSection
from suformer.corpora import peoples_daily
from suformer.pretrain.data.dataset import examples_from_documents
from suformer.pretrain.data.objectives.pegasus import chunk_units, pseudo_summary
from suformer.tokenizer import Tokenizer, build_vocab, write_vocab


def published_pseudo_summary(units, summary_rate=0.25):
    """ZhuiyiTechnology/t5-pegasus train.py, as published (numpy argmax -> first maximum)."""
    import pylcs

    source_idxs, target_idxs = list(range(len(units))), []
    while True:
        sims = []
        for i in source_idxs:
            new_source = "".join(units[j] for j in [j for j in source_idxs if j != i])
            new_target = "".join(units[j] for j in sorted(target_idxs + [i]))
            sims.append(pylcs.lcs(new_source, new_target))
        new_idx = source_idxs[sims.index(max(sims))]
        source_idxs.remove(new_idx)
        target_idxs = sorted(target_idxs + [new_idx])
        source = "".join(units[j] for j in source_idxs)
        target = "".join(units[j] for j in target_idxs)
        if len(source_idxs) == 1 or 1.0 * len(target) / len(source) > summary_rate:
            break
    if len(source) < len(target):
        source, target = target, source
    return source, target


def _articles(paragraphs, chars):
    group, length = [], 0
    for p in paragraphs:
        group.append(p)
        length += len(p)
        if length >= chars:
            yield group
            group, length = [], 0


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    args = parser.parse_args()
    docs = list(itertools.islice(peoples_daily(), args.docs))
    print(f"# {platform.machine()}, 1 core, {len(docs)} People's Daily paragraphs")
    rows = []
    # Paragraphs give short chunks (3-5 units); the published setting is ~768-character chunks of long documents,
    # which joining consecutive paragraphs into 2,000-character articles reproduces.
    articles = ["\n".join(group) for group in _articles(docs, 2000)]
    for label, corpus in (("paragraph chunks", docs), ("768-char chunks", articles)):
        chunks = [c for d in corpus for c in chunk_units(d)]
        published, t_ref = timed(lambda: [published_pseudo_summary(c) for c in chunks])
        ours, t_fast = timed(lambda: [pseudo_summary(c) for c in chunks])
        assert ours == published, "fast pseudo-summary differs from the published algorithm"
        mean_chars = sum(len("".join(c)) for c in chunks) / len(chunks)
        rows.append((f"summary, {label}", f"t5-pegasus + pylcs (baseline), {len(chunks)} chunks, "
                     f"{mean_chars:.0f} chars", len(chunks) / t_ref, "chunks/s", 1.0))
        rows.append((f"summary, {label}", "suformer (rapidfuzz LCSseq, prefix joins)", len(chunks) / t_fast,
                     "chunks/s", t_ref / t_fast))

    with tempfile.TemporaryDirectory() as tmp:
        write_vocab(build_vocab(docs, 20000), f"{tmp}/words.txt")
        write_vocab(build_vocab(docs, 8000, words=False), f"{tmp}/chars.txt")
        for objective in ("pegasus", "mlm", "unilm"):
            tok = Tokenizer(f"{tmp}/words.txt", pre_tokenize="jieba") if objective == "pegasus" else \
                Tokenizer(f"{tmp}/chars.txt", pre_tokenize=None)
            data = DataSection(objective=objective)
            examples_from_documents(docs[:50], data, tok)  # warm jieba and caches
            columns, seconds = timed(lambda: examples_from_documents(docs, data, tok))
            tokens = sum(columns["num_tokens"]) + sum(len(t) for t in columns.get("target_ids", []))
            rows.append((f"examples: {objective}", "documents/s", len(docs) / seconds, "docs/s", None))
            rows.append((f"examples: {objective}", "tokens/s", tokens / seconds, "tokens/s", None))

    print(f"| {'stage':<26} | {'implementation / measure':<56} | {'rate':>18} | {'vs baseline':>11} |")
    print(f"|{'-' * 28}|{'-' * 58}|{'-' * 20}|{'-' * 13}|")
    for stage, what, rate, unit, ratio in rows:
        ratio_text = f"{ratio:.1f}x" if ratio is not None else ""
        print(f"| {stage:<26} | {what:<56} | {rate:>9,.1f} {unit:<8} | {ratio_text:>11} |")


if __name__ == "__main__":
    main()
