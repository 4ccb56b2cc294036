"""Corpus -> training examples -> shuffled Parquet shards, a Ray Data pipeline that runs on the cluster.

The driver lists the corpus and checks a sample of every file (`corpus.preflight`); Ray Data tasks read the files
(`reader.read_corpus`) and, fused with the reads, clean, count and build examples; a seeded global shuffle mixes
them, and tasks write `shard-*.parquet` files into a fresh build folder under the shards' directory, whose
`_READY.json` marker, written last, names the build's files (shards without it are never used). Nothing is
renamed, so the run root may be on object storage (`storage.Location`). The driver never holds documents: what it
receives are counts, from a small counting actor. The rows are the objective's (`objectives/`), one per example.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import re
import time
from collections import Counter
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from ...config import DataSection
from ...ray_connect import ray_data_console_warnings_only
from ...storage import Location
from ...tokenizer import Tokenizer, count_vocab_tokens, load_vocab, vocab_from_counts, write_vocab
from .corpus import Corpus, CorpusFile, DataError, preflight
from .objectives import OBJECTIVES

READY = "_READY.json"


def examples_from_documents(docs: Iterable[str], data: DataSection, tokenizer: Tokenizer,
                            counts: Optional[Counter] = None) -> dict[str, list]:
    """Column lists of the objective's examples made from `docs`; documents that make none are counted in
    `counts["documents_without_examples"]`."""
    objective = OBJECTIVES[data.objective]
    columns: dict[str, list] = {name: [] for name in objective.schema.names}
    counts = Counter() if counts is None else counts
    for doc in docs:
        rows = objective.examples(doc, data, tokenizer)
        counts["documents_without_examples"] += not rows
        for row in rows:
            for name, column in columns.items():
                column.append(row[name])
    return columns


def _document_counts(batch: dict) -> Counter:
    """What the reader skipped or repaired in a batch of document rows (corpus.DOCUMENT_SCHEMA)."""
    skipped = Counter(str(s) for s in batch["skipped"])
    return Counter({"documents": skipped.pop("", 0), "skipped_empty_documents": skipped["empty"],
                    "skipped_overlong_documents": skipped["overlong"],
                    "documents_with_nul": int(sum(batch["nul"])),
                    "undecodable_lines": int(sum(batch["undecodable_lines"]))})


def _kept_texts(batch: dict) -> list[str]:
    return [str(t) for t, s in zip(batch["text"], batch["skipped"]) if not s]


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab: str, pre_tokenize: Optional[str]) -> Tokenizer:
    """One tokenizer per Ray worker process, reused by every task it runs (tasks, not an actor pool: Read and
    this map fuse into one task, and no actor holds a CPU the read and shuffle tasks wait for). `vocab`: a local
    path or URI, copied to the node once when remote."""
    return Tokenizer(Location.of(vocab).local_file(), pre_tokenize=pre_tokenize)


SHUFFLE_KEY = "_shuffle_key"
SHUFFLE_PARTITION_BYTES = 128 * 2**20  # of corpus text per shuffle partition: ~350 MB of examples to sort


def _build_examples(batch: dict, data: DataSection, vocab: str, counter) -> pa.Table:
    """Ray Data map_batches function: document rows -> the objective's example rows; counts go to `counter`."""
    objective = OBJECTIVES[data.objective]
    counts = _document_counts(batch)
    columns = examples_from_documents(_kept_texts(batch), data, _tokenizer(vocab, objective.pre_tokenize),
                                      counts)
    counts["examples"] = len(columns["num_tokens"])
    # Not waited for: a task blocked in ray.get lends its CPU out, so Ray starts another worker process for the
    # next task (27 worker starts instead of 9 at 200 MB, 132 s instead of 96 s). The driver waits for the totals.
    counter.add.remote(dict(counts))
    table = pa.Table.from_pydict(columns, schema=objective.schema)
    return table.append_column(SHUFFLE_KEY, _shuffle_keys(table.column("input_ids"), data.seed))


def _shuffle_keys(input_ids: pa.ChunkedArray, seed: int) -> pa.Array:
    """A seeded 64-bit hash of each example's tokens: ordering by it is a seeded random permutation of the
    examples, the same however Ray splits the work."""
    key = seed.to_bytes(8, "little", signed=True)
    keys = []
    for chunk in input_ids.chunks:
        offsets, values = chunk.offsets.to_numpy(), memoryview(chunk.values.to_numpy()).cast("B")
        width = chunk.type.value_type.bit_width // 8
        for start, end in zip(offsets[:-1], offsets[1:]):
            digest = hashlib.blake2b(values[start * width:end * width], digest_size=8, key=key).digest()
            keys.append(int.from_bytes(digest, "little"))
    return pa.array(keys, pa.uint64())


class _Counts:
    """A Ray actor adding up the stage's counts: the driver gets totals, never documents."""

    def __init__(self):
        self.totals = Counter()

    def add(self, counts: dict) -> None:
        self.totals.update(counts)

    def get(self) -> dict:
        return {k: v for k, v in self.totals.items() if v}


def _settled_counts(counter, examples_written: int, timeout_s: float = 60.0) -> Counter:
    """The stage's totals once every map task's (unawaited) report has arrived: when they count the examples that
    were written, or, with none written, when they stop changing."""
    import ray

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        counts = Counter(ray.get(counter.get.remote()))
        if counts["examples"] == examples_written and (examples_written or counts == last):
            return counts
        if time.monotonic() > deadline:
            print(f"[suformer] data: the stage's counts are incomplete ({counts['examples']:,} of "
                  f"{examples_written:,} examples reported)", flush=True)
            return counts
        last = counts
        time.sleep(0.2)


def _raise_data_error(error: BaseException) -> None:
    """A DataError raised inside a Ray task (a bad line deep in a file) reaches the driver wrapped in Ray's task
    errors; raise the original, whose message names the file and line."""
    seen = error
    while seen is not None:
        if type(seen) is DataError:
            raise DataError(str(seen)) from None
        seen = getattr(seen, "cause", None) or seen.__cause__


def data_fingerprint(data: DataSection, vocab: Location, files: list[CorpusFile]) -> str:
    """Same files (path, size, modification time) + same data settings + same vocab -> same shards directory, so a
    resubmitted run reuses them and an edited or added file makes new ones."""
    digest = hashlib.sha256(json.dumps(data.model_dump(exclude={"validation_examples"}), sort_keys=True).encode())
    digest.update(vocab.read_bytes())

    for file in files:
        digest.update(file.identity.encode())
    return digest.hexdigest()[:16]


def vocab_for_init(init_from: str, data_vocab: Optional[str]) -> Location:
    """The vocab to train a `model.init_from` checkpoint with: its own vocab.txt unless `data.vocab` names one,
    which must then be the same file. Token ids index the model's embedding, so any other vocab is an error."""
    try:
        source = Location.of(init_from)
        size = json.loads((source / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"model.init_from: {init_from} is not a save_pretrained directory "
                        "(no readable config.json with vocab_size)") from None
    own = source / "vocab.txt"
    vocab = _vocab_location(data_vocab) if data_vocab else own
    if not vocab.is_file():
        hint = "" if data_vocab else " (set data.vocab to the vocab the model was trained with)"
        raise DataError(f"data.vocab: {vocab} not found{hint}")
    tokens = len(load_vocab(check_vocab(vocab, "pegasus").local_file()))  # the objective is checked with the config
    if tokens != size:
        raise DataError(f"data.vocab: {vocab} has {tokens} tokens, model.init_from {source} has vocab_size {size}")
    if own.is_file() and vocab != own and own.read_bytes() != vocab.read_bytes():
        raise DataError(f"data.vocab: {vocab} is not the vocab model.init_from was trained with ({own}): "
                        "same size, different tokens")
    return vocab


def _vocab_location(path) -> Location:
    try:
        return Location.of(path)
    except (OSError, ValueError) as error:
        raise DataError(f"data.vocab: {path!r}: {error}") from None


def check_vocab(path, objective: str) -> Location:
    """A `data.vocab` file (local or a URI) the tokenizer can use, or a DataError naming what is wrong with it."""
    vocab = _vocab_location(path)
    if not vocab.is_file():
        raise DataError(f"data.vocab: {vocab} " + ("is a directory" if vocab.is_dir() else "not found"))
    try:
        tokens = load_vocab(vocab.local_file())
    except UnicodeDecodeError:
        raise DataError(f"data.vocab: {vocab} is not a UTF-8 text file (one token per line)") from None
    except ValueError as error:
        raise DataError(f"data.vocab: {error}") from None
    if objective != "pegasus" and "[MASK]" not in tokens:
        raise DataError(f"data.vocab: {vocab} has no [MASK] token, which data.objective={objective} needs")
    return vocab


def ensure_vocab(data: DataSection, root, init_from: Optional[str] = None, corpus=None) -> Location:
    """The configured vocab (checked against `init_from`'s), or one counted from a sample of the corpus on the
    cluster (jieba words + characters for PEGASUS, characters for MLM/UniLM) and cached under `root`/vocab (a
    local path or URI). `corpus` is `corpus.preflight`'s result, when the caller has it."""
    if init_from:
        return vocab_for_init(init_from, data.vocab)
    if data.vocab:
        return check_vocab(data.vocab, data.objective)
    fs, files, _ = corpus or preflight(data)
    chosen, keep_rate = _vocab_sample(data, files)
    words = OBJECTIVES[data.objective].vocab_words
    key = hashlib.sha256(json.dumps([data.vocab_size, words, data.vocab_sample_mb, data.seed,
                                     data.max_documents, data.txt_documents, data.text_key, data.encoding,
                                     data.max_document_chars] + [f.identity for f in chosen]).encode())
    path = Location.of(root) / "vocab" / key.hexdigest()[:16] / "vocab.txt"
    if path.is_file():
        return path
    chars, multi = _count_tokens(data, fs, chosen, keep_rate, words)
    if not chars:
        raise DataError(f"data.corpus: {data.corpus!r} holds no non-empty document")
    write_vocab(vocab_from_counts(chars, multi, data.vocab_size), path)  # whole or not at all
    return path


def _vocab_sample(data: DataSection, files: list[CorpusFile]) -> tuple[list[CorpusFile], float]:
    """Which files the vocab is counted on and what share of their documents: files in a seeded order until
    they hold 4x `data.vocab_sample_mb` (variety at a bounded read cost), documents kept by a seeded hash of their
    text at the rate that leaves about `vocab_sample_mb`. Reproducible from the seed, whatever the cluster."""
    budget = data.vocab_sample_mb * 2**20
    if data.max_documents or sum(f.size for f in files) <= budget:
        return files, 1.0  # small runs count everything they train on
    order = sorted(files, key=lambda f: hashlib.sha256(f"{data.seed}:{f.path}".encode()).digest())
    chosen, size = [], 0
    for file in order:
        if size >= 4 * budget:
            break
        chosen.append(file)
        size += file.size
    return sorted(chosen, key=lambda f: f.path), min(1.0, budget / size)


def _count_batch(batch: dict, words: bool, keep_rate: float, seed: int) -> dict:
    """Ray Data map_batches function: (token, count) rows of one batch's sampled documents. A document is in the
    sample when a seeded hash of its text falls under the rate: the same sample however the work is split."""

    def kept(text: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
        return keep_rate >= 1.0 or int.from_bytes(digest[:8], "little") < keep_rate * 2**64

    chars, multi = count_vocab_tokens([t for t in _kept_texts(batch) if kept(t)], words=words)
    counts = chars + multi  # a char and a multi-character token never share a key
    return {"token": list(counts), "count": list(counts.values())}


def _count_tokens(data: DataSection, fs: pafs.FileSystem, files: list[CorpusFile], keep_rate: float,
                  words: bool) -> tuple[dict, dict]:
    """Distributed counting: batches counted by Ray Data tasks, summed by a groupby on the cluster; the driver
    receives every distinct character and the top multi-character tokens, never the text."""
    from ray.data import DataContext

    from .reader import read_corpus

    ray_data_console_warnings_only()
    print(f"[suformer] data: counting the vocab on {len(files)} corpus files (sample rate {keep_rate:.3g}) with "
          "Ray Data", flush=True)
    documents = read_corpus(data, fs, files)
    if data.max_documents:
        documents = documents.limit(data.max_documents)
    # One hash partition per 16 MiB of counted text: Ray Data's default of 200 reduce tasks costs a small corpus
    # seconds of task start-up per vocab, and 200 MB of text (the default sample) needs no more than 13.
    counted = sum(f.size for f in files) * keep_rate
    partitions = max(1, min(DataContext.get_current().default_hash_shuffle_parallelism, math.ceil(counted / 2**24)))
    try:
        counts = documents.map_batches(
            _count_batch, fn_kwargs=dict(words=words, keep_rate=keep_rate, seed=data.seed), batch_size=256,
        ).groupby("token", num_partitions=partitions).sum("count")
        # Streamed to the driver, which keeps every character (a few thousand) and a bounded heap of the
        # most frequent multi-character tokens (ties by token, as vocab_from_counts ranks them).
        chars, top = {}, []
        for batch in counts.iter_batches(batch_size=65536, batch_format="pyarrow"):
            for token, count in zip(batch.column("token").to_pylist(), batch.column("sum(count)").to_pylist()):
                if len(token) == 1:
                    chars[token] = count
                elif len(top) < data.vocab_size:
                    heapq.heappush(top, _Ranked(count, token))
                else:
                    heapq.heappushpop(top, _Ranked(count, token))
    except Exception as error:
        _raise_data_error(error)
        raise
    return chars, {r.token: r.count for r in top}


@functools.total_ordering
class _Ranked:
    """Heap entry: the heap's smallest is the token ranked last (fewest counts, then the greater token)."""

    def __init__(self, count: int, token: str):
        self.count, self.token = count, token

    def __eq__(self, other):
        return (self.count, self.token) == (other.count, other.token)

    def __lt__(self, other):
        return (self.count, other.token) < (other.count, self.token)


def check_makes_examples(data: DataSection, corpus: Corpus) -> None:
    """Exit-2 check before anything starts: the start of the corpus makes examples for the objective. (The
    commonest failure: a .txt with one sentence per line read as one document per line, too short for PEGASUS.)"""
    texts = [row["text"] for row in corpus.sample if not row["skipped"]]
    if not texts or any(OBJECTIVES[data.objective].makes_examples(t, data) for t in texts):
        return
    raise DataError(_no_examples_message(data, len(texts), corpus.files, "in the first megabyte of the corpus"))


def _no_examples_message(data: DataSection, documents: int, files: list[CorpusFile], where: str) -> str:
    hint = ""
    if data.txt_documents == "line" and any(f.kind == "txt" for f in files):
        hint = (" The .txt files are read with one document per line (data.txt_documents=line): if they hold one "
                "sentence per line with blank lines between documents, set data.txt_documents=blank_line.")
    return (f"data.corpus: none of the {documents} documents {where} makes a {data.objective} example: "
            f"{OBJECTIVES[data.objective].no_example_reason(data)}.{hint}")


def prepare_shards(data: DataSection, vocab, root, corpus=None) -> Location:
    """Build (or reuse) the shuffled Parquet shards for `data` on the cluster; returns their directory, under
    `root` (a local path or URI). `corpus` is `corpus.preflight`'s result, when the caller has it."""
    import ray
    from ray.data import SaveMode

    from .reader import ShardNames, read_corpus

    fs, files, _ = corpus or preflight(data)
    vocab = Location.of(vocab)
    out = Location.of(root) / "data" / data_fingerprint(data, vocab, files)
    if _sound_build_exists(out):
        return out
    ray_data_console_warnings_only()
    size = sum(f.size for f in files)
    print(f"[suformer] data: making examples from {len(files)} corpus files ({size / 2**20:,.1f} MiB) with Ray Data "
          "(log: the Ray session's logs/ray-data)", flush=True)
    build = out / f"build-{time.time_ns()}"
    counter = ray.remote(num_cpus=0)(_Counts).remote()
    documents = read_corpus(data, fs, files)
    # This pipeline's own context (its datasets share one copy): Ray Data's per-operator reservations left example
    # building one of two CPUs here while the shuffle waited for its input (80 MB: 150-157 s with, 101-119 s
    # without); the object-store backpressure still applies.
    documents.context.op_resource_reservation_enabled = False
    if data.max_documents:
        documents = documents.limit(data.max_documents)
    examples = documents.map_batches(
        _build_examples, fn_kwargs=dict(data=data, vocab=vocab.uri, counter=counter), batch_size=64,
    )
    # A seeded global shuffle, so that no worker trains in corpus order: rows go to hash partitions by their random
    # key and each partition is sorted by it (Ray Data's hash shuffle). Not random_shuffle(): its all-to-all
    # returns blocks of a few KB that Ray keeps in the driver's heap, which grew with the corpus (0.4 GB per
    # 80 MB measured). The shards, once written, fix the order for every epoch and resume.
    partitions = max(1, math.ceil(size / SHUFFLE_PARTITION_BYTES))
    try:
        examples.repartition(partitions, keys=[SHUFFLE_KEY], sort=True).drop_columns([SHUFFLE_KEY]).write_parquet(
            build.path, filesystem=build.fs, filename_provider=ShardNames(), mode=SaveMode.CREATE,  # a fresh folder
            min_rows_per_file=data.rows_per_shard // 2, max_rows_per_file=data.rows_per_shard, row_group_size=256)
    except Exception as error:
        _raise_data_error(error)
        raise
    names = sorted(build.files(), key=lambda name: [int(n) for n in re.findall(r"\d+", name)])
    shard_rows = {f"{build.name}/{name}": _check_parquet(build / name) for name in names}
    counts = _settled_counts(counter, sum(shard_rows.values()))
    ray.kill(counter)
    if not counts["examples"]:
        build.delete()
        raise DataError(_no_examples_message(data, counts["documents"], files, "read")
                        if counts["documents"] else f"data.corpus: {data.corpus!r} holds no non-empty document "
                        f"({dict(counts)})")
    (out / READY).write_text(json.dumps({**counts, "shards": len(names), "build": build.name,
                                         "shard_rows": shard_rows}))
    return out


def _sound_build_exists(out: Location) -> bool:
    """Whether `out` holds a complete, undamaged build to reuse. If not, the builds of interrupted attempts (never
    named by a READY marker) are removed; a damaged build stays for inspection (nothing written is deleted) and
    a new build replaces it."""
    ready = out / READY
    if ready.is_file():
        problem = _shards_problem(out)
        if problem is None:
            return True
        print(f"[suformer] data: {problem}; rebuilding", flush=True)
    kept = json.loads(ready.read_text())["build"] if ready.is_file() else None
    for leftover in out.folders():
        if leftover.name.startswith("build-") and leftover.name != kept:
            leftover.delete()
    return False


def _check_parquet(file: Location) -> int:
    """Rows of a readable Parquet file, else a DataError naming it (read from the footer: cheap)."""
    import pyarrow.parquet as pq

    try:
        with file.fs.open_input_file(file.path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None


def _shards_problem(directory: Location) -> Optional[str]:
    """Why a finished shard directory cannot be trained on (a missing, unreadable or short shard), else None."""
    directory = Location.of(directory)
    ready = json.loads((directory / READY).read_text())
    present = directory.files()
    for name, rows in ready["shard_rows"].items():
        if name not in present:
            return f"{directory / name} is missing"
        try:
            found = _check_parquet(directory / name)
        except DataError as error:
            return str(error)
        if found != rows:
            return f"{directory / name} has {found} rows, {rows} were written"
    return None


def shard_files(directory) -> list[str]:
    """The shard files a ready shards directory names, in order, as its filesystem names them."""
    return list(shard_rows(directory))


def shard_rows(directory) -> dict[str, int]:
    """{shard file: rows} of a ready shards directory, in order, the files as its filesystem names them."""
    directory = Location.of(directory)
    return {(directory / name).path: rows
            for name, rows in json.loads((directory / READY).read_text())["shard_rows"].items()}

