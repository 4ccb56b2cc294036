"""Ray Data glue of the data stage: the corpus reader (a file datasource over `corpus.file_documents`) and the
shards' file names.

Kept apart from `corpus` because importing Ray reads its settings (token auth) once: the jobs' preflight imports
`corpus` before they have set them.
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FileBasedDatasource, FilenameProvider

from ...config import DataSection
from .corpus import DOCUMENT_SCHEMA, ROWS_PER_BLOCK, CorpusFile, file_documents


def read_corpus(data: DataSection, fs: pafs.FileSystem, files: list[CorpusFile]) -> ray.data.Dataset:
    """A Ray Dataset of document rows (corpus.DOCUMENT_SCHEMA), read by tasks on the cluster, files in order."""
    return ray.data.read_datasource(_CorpusDatasource(data, fs, files))


class ShardNames(FilenameProvider):
    """`shard-<write task>-<file of the task>.parquet`: names that sort in the written (shuffled) order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:05d}-{{i}}.parquet"


class _CorpusDatasource(FileBasedDatasource):

    """Ray Data's file reader with our formats: streams each file in 4 MiB chunks (Ray's read_text reads a whole
    file into memory and decodes it strictly) and keeps the cleaning rules and the per-document counts."""

    def __init__(self, data: DataSection, fs: pafs.FileSystem, files: list[CorpusFile]):
        super().__init__([f.path for f in files], filesystem=fs)
        self._data = data
        self._kinds = {f.path: f.kind for f in files}

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._kinds[path] == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access, not a stream
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows = file_documents(f, self._kinds[path], path, self._data)
        block = []
        for row in rows:
            block.append(row)
            if len(block) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(block, schema=DOCUMENT_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=DOCUMENT_SCHEMA)
