"""Corpus -> training examples -> Parquet shards, as a Ray Data stage that scales with the cluster's CPUs.

Input: the bundled People's Daily corpus, or files: `.txt` (one document per line), `.jsonl` (a `text` field per
line) and `.parquet` (a `text` column). Output: `shard-NNNNN.parquet` files under one directory, in corpus order,
with a `_READY.json` marker written last (a directory without it is never used). Schema, one row per example:

  pegasus  input_ids list<int32>  [CLS] source [SEP];   target_ids list<int32>  [CLS] summary [SEP]
  mlm      input_ids list<int32>  masked [CLS] text [SEP];   labels list<int32>  -100 where not predicted
  unilm    input_ids list<int32>  [CLS] source [SEP] target [SEP];   token_type_ids list<int8>  0 source, 1 target
  all      num_tokens int32  (length of input_ids, for token-budget batching)

Examples are pure functions of (document, config, vocab), MLM's randomness seeded from the document's own hash, so
the shards are identical however Ray splits the work.
"""
from __future__ import annotations

import glob
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from collections import Counter
from typing import Iterable, Iterator, Optional

import pyarrow as pa

from ..config import DataSection
from ..tokenizer import Tokenizer, build_vocab, load_vocab, write_vocab
from ..ray_connect import ray_data_console_warnings_only
from . import corpora
from .mlm import unilm_example, whole_word_mask
from .pegasus import chunk_units, pseudo_summary

READY = "_READY.json"
SCHEMAS = {
    "pegasus": pa.schema([("input_ids", pa.list_(pa.int32())), ("target_ids", pa.list_(pa.int32())),
                          ("num_tokens", pa.int32())]),
    "mlm": pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("num_tokens", pa.int32())]),
    "unilm": pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                        ("num_tokens", pa.int32())]),
}


class DataError(ValueError):
    """Bad corpus input, naming the file (and line) at fault."""


def corpus_files(corpus: str) -> list[Path]:
    """The files a `data.corpus` value names (comma-separated paths or globs), or an error naming it."""
    files = []
    for pattern in (p.strip() for p in corpus.split(",") if p.strip()):
        matched = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matched:
            raise DataError(f"data.corpus: {pattern!r} matches no file")
        files.extend(Path(m) for m in matched)
    for f in files:
        if f.suffix not in (".txt", ".jsonl", ".parquet"):
            raise DataError(f"data.corpus: {f}: unsupported format {f.suffix!r} (use .txt, .jsonl or .parquet)")
        if f.suffix == ".parquet":
            _check_parquet(f, "data.corpus: ")
        if f.stat().st_size == 0:
            raise DataError(f"data.corpus: {f}: empty file")
    return files


def _check_parquet(path: Path, prefix: str = "") -> int:
    """Rows of a readable Parquet file, else a DataError naming it (read from the footer: cheap)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{prefix}{path}: not a readable Parquet file ({error})") from None


def _decoded_lines(path: Path, counts: Counter) -> Iterator[str]:
    """Lines as text; a line that is not valid UTF-8 is decoded with replacement characters and counted."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                counts["invalid_utf8_lines"] += 1
                yield raw.decode("utf-8", errors="replace")


def read_documents(corpus: str, max_documents=None, max_chars: int = 1_000_000,
                   counts: Optional[Counter] = None) -> Iterator[str]:
    """Documents in corpus order. Empty and over-long documents are skipped, NUL characters removed and
    non-UTF-8 lines decoded with replacement characters, each counted in `counts` when given."""
    counts = Counter() if counts is None else counts

    def documents() -> Iterator[str]:
        if corpus == "peoples_daily":
            yield from corpora.peoples_daily()
            return
        for path in corpus_files(corpus):
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
                if "text" not in table.column_names:
                    raise DataError(f"{path}: no 'text' column (columns: {table.column_names})")
                yield from (t or "" for t in table.column("text").to_pylist())  # nulls count as empty
                continue
            for line_no, line in enumerate(_decoded_lines(path, counts), 1):
                if path.suffix == ".txt":
                    yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: 'text' is {type(text).__name__}, expected a string")
                yield text

    for doc in documents():
        if "\x00" in doc:
            counts["documents_with_nul"] += 1
            doc = doc.replace("\x00", "")
        doc = doc.strip()
        if not doc:
            counts["skipped_empty_documents"] += 1
            continue
        if len(doc) > max_chars:
            counts["skipped_overlong_documents"] += 1
            continue
        yield doc
        counts["documents"] += 1
        if max_documents is not None and counts["documents"] >= max_documents:
            return


def examples_from_documents(docs: Iterable[str], data: DataSection, tokenizer: Tokenizer) -> dict[str, list]:
    """Column lists of the examples made from `docs` (see the module docstring for the schema)."""
    columns: dict[str, list] = {name: [] for name in SCHEMAS[data.objective].names}
    for doc in docs:
        if data.objective == "mlm":
            seed = int.from_bytes(hashlib.sha256(f"{data.seed}:{doc}".encode()).digest()[:8], "little")
            ids, labels = whole_word_mask(doc, tokenizer, random.Random(seed), data.max_len, data.mask_rate)
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["num_tokens"].append(len(ids))
            continue
        for units in chunk_units(doc, data.unit_chars, data.chunk_chars, data.min_units):
            source, target = pseudo_summary(units, data.summary_rate)
            if data.objective == "pegasus":
                ids = tokenizer.encode(source, maxlen=data.max_source_len)
                columns["input_ids"].append(ids)
                columns["target_ids"].append(tokenizer.encode(target, maxlen=data.max_target_len))
            else:
                ids, segments = unilm_example(source, target, tokenizer, data.max_len)
                columns["input_ids"].append(ids)
                columns["token_type_ids"].append(segments)
            columns["num_tokens"].append(len(ids))
    return columns


class _ExampleBuilder:
    """Ray Data map_batches callable: one tokenizer per worker process."""

    def __init__(self, data: dict, vocab_path: str):
        self.data = DataSection.model_validate(data)
        mode = "jieba" if self.data.objective == "pegasus" else None
        self.tokenizer = Tokenizer(vocab_path, pre_tokenize=mode)

    def __call__(self, batch: dict) -> pa.Table:
        columns = examples_from_documents(batch["text"], self.data, self.tokenizer)
        return pa.Table.from_pydict(columns, schema=SCHEMAS[self.data.objective])


def data_fingerprint(data: DataSection, vocab_path: Path) -> str:
    """Same corpus settings + same vocab -> same shards directory (so a resubmitted run reuses them)."""
    digest = hashlib.sha256(json.dumps(data.model_dump(), sort_keys=True).encode())
    digest.update(vocab_path.read_bytes())
    return digest.hexdigest()[:16]


def vocab_for_init(init_from: str, data_vocab: Optional[str]) -> Path:
    """The vocab to train a `model.init_from` checkpoint with: its own vocab.txt unless `data.vocab` names one,
    which must then be the same file. Token ids index the model's embedding, so any other vocab is an error."""
    source = Path(init_from).expanduser()
    try:
        size = json.loads((source / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"model.init_from: {source} is not a save_pretrained directory "
                        "(no readable config.json with vocab_size)") from None
    own = source / "vocab.txt"
    vocab = Path(data_vocab).expanduser() if data_vocab else own
    if not vocab.is_file():
        hint = "" if data_vocab else " (set data.vocab to the vocab the model was trained with)"
        raise DataError(f"data.vocab: {vocab} not found{hint}")
    tokens = len(load_vocab(vocab))
    if tokens != size:
        raise DataError(f"data.vocab: {vocab} has {tokens} tokens, model.init_from {source} has vocab_size {size}")
    if own.is_file() and vocab != own and own.read_bytes() != vocab.read_bytes():
        raise DataError(f"data.vocab: {vocab} is not the vocab model.init_from was trained with ({own}): "
                        "same size, different tokens")
    return vocab


def ensure_vocab(data: DataSection, root: Path, init_from: Optional[str] = None) -> Path:
    """The configured vocab (checked against `init_from`'s), or one built from the corpus (words + chars for
    PEGASUS, chars for MLM/UniLM)."""
    if init_from:
        return vocab_for_init(init_from, data.vocab)
    if data.vocab:
        path = Path(data.vocab).expanduser()
        if not path.exists():
            raise DataError(f"data.vocab: {path} not found")
        return path
    key = hashlib.sha256(f"{data.corpus}|{data.max_documents}|{data.vocab_size}|{data.objective}".encode())
    path = root / "vocab" / key.hexdigest()[:16] / "vocab.txt"
    if not path.exists():
        docs = list(read_documents(data.corpus, min(data.max_documents or 20000, 20000), data.max_document_chars))
        if not docs:
            raise DataError(f"data.corpus: {data.corpus!r} holds no non-empty document")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_vocab(build_vocab(docs, data.vocab_size, words=data.objective == "pegasus"), tmp)
        tmp.replace(path)
    return path


def prepare_shards(data: DataSection, vocab_path: Path, root: Path, min_shards: int = 1) -> Path:
    """Build (or reuse) the Parquet shards for `data` with Ray Data; returns their directory."""
    import ray

    out = root / "data" / data_fingerprint(data, vocab_path)
    if (out / READY).exists():
        problem = _shards_problem(out)
        if problem is None:
            return out
        # Keep the damaged copy for inspection (nothing written is deleted) and build the shards again.
        aside = out.with_name(f"{out.name}.damaged-{int(time.time())}")
        out.rename(aside)
        print(f"[suformer] data: {problem}; moved to {aside} and rebuilding", flush=True)
    counts = Counter()
    docs = list(read_documents(data.corpus, data.max_documents, data.max_document_chars, counts))
    if not docs:
        raise DataError(f"data.corpus: {data.corpus!r} holds no non-empty document")
    ray_data_console_warnings_only()
    print(f"[suformer] data: making examples from {len(docs)} documents with Ray Data (log: the Ray session's "
          "logs/ray-data)", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard files in corpus order: deterministic per-worker streams
    num_blocks = max(min_shards, -(-len(docs) // max(1, data.rows_per_shard // 2)))
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted attempt
    ds = ray.data.from_items([{"text": d} for d in docs], override_num_blocks=num_blocks)
    ds = ds.map_batches(
        _ExampleBuilder, fn_constructor_kwargs=dict(data=data.model_dump(), vocab_path=str(vocab_path)),
        batch_size=64, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)))),
    )
    ds.write_parquet(str(staging), min_rows_per_file=data.rows_per_shard, row_group_size=256)
    files = sorted(staging.glob("*.parquet"))
    shard_rows = {}
    for i, f in enumerate(files):
        shard = f.rename(staging / f"shard-{i:05d}.parquet")
        shard_rows[shard.name] = _check_parquet(shard)
    (staging / READY).write_text(json.dumps({**counts, "documents": len(docs), "examples": sum(shard_rows.values()),
                                             "shards": len(files), "shard_rows": shard_rows}))
    staging.rename(out)
    return out


def _shards_problem(directory: Path) -> Optional[str]:
    """Why a finished shard directory cannot be trained on (a missing, unreadable or short shard), else None."""
    ready = json.loads((directory / READY).read_text())
    for name, rows in ready.get("shard_rows", {}).items():
        path = directory / name
        if not path.exists():
            return f"{path} is missing"
        try:
            found = _check_parquet(path)
        except DataError as error:
            return str(error)
        if found != rows:
            return f"{path} has {found} rows, {rows} were written"
    return None


def shard_files(directory: Path) -> list[str]:
    return [str(p) for p in sorted(Path(directory).glob("shard-*.parquet"))]
