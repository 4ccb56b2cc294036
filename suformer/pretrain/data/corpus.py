"""Corpus files -> documents: listing, a preflight that rejects bad input before work starts, and the streaming
reader Ray Data runs on the cluster.

Formats: `.txt` (optionally compressed: `.txt.gz`, `.txt.zst`, ...), `.jsonl` (a `data.text_key` field per line,
compressed alike) and `.parquet` (a `data.text_key` column, the only one read). `data.corpus` names files, globs,
directories (every supported file under them) or "peoples_daily" (bundled), comma-separated.

Documents in `.txt` follow `data.txt_documents`: "blank_line" (the BERT pretraining convention: one sentence per
line, a blank line between documents; a document is its lines joined with newlines) or "line" (one document per
line). Cleaning, the same for every format: a line the encoding cannot decode is decoded with U+FFFD and counted,
NUL characters are removed, empty documents and lines longer than `data.max_document_chars` are skipped; a
blank-line document that grows past that limit is cut at a line boundary (nothing is thrown away).

The reader (`reader.py`, Ray Data's side) emits one row per document read, skipped ones included with empty text
and the reason, so that the stage after it counts what was skipped without a side channel: columns `text`,
`skipped` ("", "empty", "overlong"), `nul` (bool), `undecodable_lines` (int32).
"""
from __future__ import annotations

import codecs
import fnmatch
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from ...config import DataSection
from ...storage import Location

PEOPLES_DAILY = "peoples_daily"
TEXT_FORMATS = (".txt", ".jsonl")
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
SAMPLE_BYTES = 1 << 20  # what the preflight reads of each text file
DOCUMENT_SCHEMA = pa.schema([("text", pa.string()), ("skipped", pa.string()), ("nul", pa.bool_()),
                             ("undecodable_lines", pa.int32())])
ROWS_PER_BLOCK = 1024


class DataError(ValueError):
    """Bad corpus input, naming the file (and line or key) at fault."""


@dataclass(frozen=True)
class CorpusFile:
    path: str  # as the filesystem names it (a local path, or bucket/key)
    size: int
    mtime_ns: int
    kind: str  # "txt", "jsonl", "parquet" or "tagged" (the bundled People's Daily: word/tag pairs per line)

    @property
    def identity(self) -> str:
        """What changes when the file does: part of the shards' fingerprint."""
        return f"{self.path}|{self.size}|{self.mtime_ns}"


def _kind(path: str) -> Optional[str]:
    """The format a file name says: text formats may carry a compression suffix, Parquet compresses inside."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return next((kind[1:] for kind in TEXT_FORMATS if name.endswith(kind)), None)


def _filesystem(entry: str) -> tuple[pafs.FileSystem, str]:
    """A URI's filesystem (s3://, gs://, ...), else the local one; local paths never go through URI parsing, where
    a `?` in a glob would start a query."""
    try:
        location = Location.of(entry)
    except (pa.ArrowInvalid, ValueError) as error:
        raise DataError(f"data.corpus: {entry!r}: {error}") from None
    return location.fs, location.path



def _file(info: pafs.FileInfo, kind: Optional[str] = None) -> CorpusFile:
    return CorpusFile(info.path, info.size, info.mtime_ns or 0, kind or _kind(info.path))


def list_corpus(corpus: str) -> tuple[pafs.FileSystem, list[CorpusFile]]:
    """The files `data.corpus` names, in a stable order, or a DataError naming the entry that names none."""
    files: list[CorpusFile] = []
    filesystem = None
    for entry in (e.strip() for e in corpus.split(",") if e.strip()):
        if entry == PEOPLES_DAILY:
            from ...corpora import peoples_daily_path

            fs, path = pafs.LocalFileSystem(), str(peoples_daily_path())
            found = [_file(fs.get_file_info(path), "tagged")]
        else:
            fs, path = _filesystem(entry)
            found = _expand(fs, path, entry)
        if filesystem is not None and fs.type_name != filesystem.type_name:
            raise DataError(f"data.corpus: {entry!r} is on {fs.type_name}, the entries before it on "
                            f"{filesystem.type_name}: keep a corpus on one filesystem")
        filesystem = fs
        files.extend(found)
    if not files:
        raise DataError("data.corpus is empty")
    return filesystem, files


def _expand(fs: pafs.FileSystem, path: str, entry: str) -> list[CorpusFile]:
    """One `data.corpus` entry: a file, a directory (every supported file under it) or a glob."""
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        matched = sorted((i for i in infos if i.is_file and fnmatch.fnmatchcase(i.path, path)), key=lambda i: i.path)
        if not matched:
            raise DataError(f"data.corpus: {entry!r} matches no file")
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data.corpus: {entry!r} matches no file")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            # Hidden files and `_`-prefixed markers (_SUCCESS, _READY.json) are not corpus, as Ray Data lists.
            matched = sorted((i for i in infos if i.is_file and not i.base_name.startswith((".", "_"))
                              and _kind(i.path)), key=lambda i: i.path)
            if not matched:
                held = sorted({i.extension or i.base_name for i in infos if i.is_file})[:8]
                raise DataError(f"data.corpus: directory {entry!r} holds no .txt, .jsonl or .parquet file"
                                + (f" (it holds: {', '.join(held)})" if held else " (it is empty)"))
        else:
            matched = [info]
    files = []
    for info in matched:
        if not _kind(info.path):
            raise DataError(f"data.corpus: {info.path}: unsupported format (use .txt, .jsonl or .parquet; "
                            f"text files may be compressed: {', '.join(COMPRESSED)})")
        if info.size == 0:
            raise DataError(f"data.corpus: {info.path}: empty file")
        files.append(_file(info))
    return files


# -- decoding and documents: one code path for the preflight sample and for the cluster's reader -----------------

def _decoder(encoding: Optional[str]):
    """Strict decoder for one line; UTF-8 accepts (and drops) a byte-order mark."""
    codec = codecs.lookup(encoding or "utf-8-sig")
    return lambda raw: codec.decode(raw)[0]


def _lines(chunks: Iterable[bytes], encoding: Optional[str]) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without its line ending, decoded cleanly) for each line of a byte stream."""
    decode = _decoder(encoding)
    name = encoding or "utf-8"
    rest, number = b"", 0
    first = True
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for raw in lines:
            number += 1
            yield _decoded(raw, number, decode, name, first)
            first = False
    if rest:
        yield _decoded(rest, number + 1, decode, name, first)


def _decoded(raw: bytes, number: int, decode, name: str, first: bool) -> tuple[int, str, bool]:
    raw = raw.removesuffix(b"\r")  # Windows line endings
    if first and name == "utf-8":
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return number, decode(raw), True
    except UnicodeDecodeError:
        return number, raw.decode(name, errors="replace"), False


def _tagged_text(line: str) -> str:
    """People's Daily `word/tag word/tag ...` -> the words joined back."""
    return "".join(w for w, sep, _ in (item.rpartition("/") for item in line.split()) if w and sep)


def documents(lines: Iterable[tuple[int, str, bool]], kind: str, path: str, data: DataSection) -> Iterator[dict]:
    """Document rows (see the module docstring) from the decoded lines of one text file."""
    limit = data.max_document_chars
    if kind == "txt" and data.txt_documents == "blank_line":
        parts, size, bad = [], 0, 0
        for _, line, clean in lines:
            if not line.strip():
                if parts:
                    yield _row("\n".join(parts), bad)
                parts, size, bad = [], 0, 0
                continue
            if len(line) > limit:
                yield _row("", int(not clean), "overlong")
                continue
            if parts and size + len(line) > limit:  # cut at a line boundary: nothing thrown away
                yield _row("\n".join(parts), bad)
                parts, size, bad = [], 0, 0
            parts.append(line)
            size += len(line) + 1
            bad += not clean
        if parts:
            yield _row("\n".join(parts), bad)
        return
    for number, line, clean in lines:
        if kind == "jsonl":
            if not line.strip():
                continue
            line = _json_text(line, path, number, data.text_key)
        elif kind == "tagged":
            line = _tagged_text(line)
        yield _row(line, int(not clean), "overlong" if len(line) > limit else None)


def _row(text: str, undecodable: int, skipped: Optional[str] = None) -> dict:
    nul = "\x00" in text
    text = text.replace("\x00", "").strip() if skipped is None else ""
    if skipped is None and not text:
        skipped = "empty"
    return {"text": text, "skipped": skipped or "", "nul": nul, "undecodable_lines": undecodable}


def _json_text(line: str, path: str, number: int, key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    if not isinstance(record, dict) or key not in record:
        found = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{number}: no {key!r} field (found: {found}); set data.text_key") from None
    text = record[key]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: {key!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(source, path: str, data: DataSection) -> Iterator[dict]:
    for batch in _parquet_file(source, path, data.text_key).iter_batches(columns=[data.text_key],
                                                                          batch_size=ROWS_PER_BLOCK):
        for text in batch.column(0).to_pylist():  # nulls count as empty documents
            yield _row(text or "", 0, "overlong" if text and len(text) > data.max_document_chars else None)


def _parquet_file(source, path: str, key: str):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"data.corpus: {path}: not a readable Parquet file ({error})") from None
    schema = parquet.schema_arrow
    if key not in schema.names:
        raise DataError(f"data.corpus: {path}: no {key!r} column (columns: {schema.names}); set data.text_key")
    if not (pa.types.is_string(schema.field(key).type) or pa.types.is_large_string(schema.field(key).type)):
        raise DataError(f"data.corpus: {path}: column {key!r} is {schema.field(key).type}, expected strings")
    return parquet


def _chunks(stream, size: int = 4 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def _open_text(fs: pafs.FileSystem, path: str):
    return fs.open_input_stream(path, compression="detect")


# -- preflight: every file checked on a small sample before anything starts --------------------------------------

def _likely_encoding(raw: bytes) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    for candidate in ("gb18030", "big5"):
        try:
            raw.decode(candidate)
            return "gbk" if candidate == "gb18030" else candidate
        except UnicodeDecodeError:
            continue
    return "unknown"


def _check_encoding(sample: bytes, path: str, encoding: Optional[str]) -> None:
    """A file most of whose sampled lines the encoding cannot decode was written in another one: exit 2, not
    a corpus of U+FFFD. A few bad lines are corruption, repaired and counted."""
    lines = list(_lines([sample], encoding))
    if len(sample) == SAMPLE_BYTES and len(lines) > 1:
        lines.pop()  # cut mid-line (perhaps mid-character) by the sample's end
    bad = [number for number, _, clean in lines if not clean]
    if not bad or len(bad) * 2 < len(lines):
        return
    guess = _likely_encoding(sample[: sample.rfind(b"\n") + 1] or sample)
    hint = f"it looks like {guess}: set data.encoding={guess}" if guess != "unknown" else "set data.encoding"
    raise DataError(f"data.corpus: {path}: not {encoding or 'UTF-8'} text ({len(bad)} of the first {len(lines)} "
                    f"lines cannot be decoded, the first at line {bad[0]}); {hint}")


class Corpus(NamedTuple):
    """What the preflight found: where the files are, which, and the first non-empty sample's document rows
    (for the objective's own check)."""
    fs: pafs.FileSystem
    files: list[CorpusFile]
    sample: list[dict]


def preflight(data: DataSection) -> Corpus:
    """List the corpus and read the start of every file, raising a DataError naming the file (and line) for any
    input the cluster's reader would reject."""
    fs, files = list_corpus(data.corpus)
    # Samples read concurrently: on object storage each is a request whose latency dominates.
    with ThreadPoolExecutor(16) as pool:
        samples = list(pool.map(lambda file: _sample_documents(fs, file, data), files))
    return Corpus(fs, files, next((s for s in samples if s), []))


def _sample_documents(fs: pafs.FileSystem, file: CorpusFile, data: DataSection) -> list[dict]:
    if file.kind == "parquet":
        with fs.open_input_file(file.path) as f:
            parquet = _parquet_file(f, file.path, data.text_key)
            if not parquet.metadata.num_row_groups:
                return []
            rows = parquet.read_row_group(0, columns=[data.text_key]).column(0).to_pylist()[:200]
        return [_row(t or "", 0) for t in rows]
    with _open_text(fs, file.path) as f:
        sample = f.read(SAMPLE_BYTES)
    if file.kind != "tagged":
        _check_encoding(sample, file.path, data.encoding)
    if len(sample) == SAMPLE_BYTES:
        sample = sample[: sample.rfind(b"\n") + 1] or sample
    encoding = data.encoding if file.kind != "tagged" else None
    return list(documents(_lines([sample], encoding), file.kind, file.path, data))  # jsonl lines parsed strictly


def file_documents(f, kind: str, path: str, data: DataSection) -> Iterator[dict]:
    """Document rows of one open corpus file (a stream; random access for Parquet)."""
    if kind == "parquet":
        return _parquet_documents(f, path, data)
    return documents(_lines(_chunks(f), data.encoding if kind != "tagged" else None), kind, path, data)
