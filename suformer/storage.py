"""Where a run reads and writes: a local folder or an object-store prefix (s3://, gs://, ...), through one API.

pyarrow.fs does the work; it is also the filesystem Ray Data and Ray Train take, so the same `Location` is handed
to them. Object stores have no rename and never show half an object: a file written here appears whole or not at
all (locally: written beside and moved into place), and a set of files that must look complete (shards,
checkpoints) is written under a fresh name with a marker or manifest last, never moved into place. Credentials and
endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS...).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union


import pyarrow.fs as pafs

URI_SCHEMES = {"s3": "s3", "gcs": "gs"}  # pyarrow filesystem type -> URI scheme


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # as the filesystem names it: an absolute local path, or bucket/key

    @classmethod
    def of(cls, where: Union[str, os.PathLike, "Location"]) -> "Location":
        """A local path (with ~) or a URI; an unknown scheme is a ValueError naming it."""
        if isinstance(where, Location):
            return where
        where = str(where)
        if "://" in where:
            fs, path = pafs.FileSystem.from_uri(where)
            return cls(fs, path.rstrip("/"))
        return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(where)))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def uri(self) -> str:
        if self.is_local:
            return self.path
        return f"{URI_SCHEMES.get(self.fs.type_name, self.fs.type_name)}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path))

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: an object is one PUT; a local file is written beside and moved into place."""
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        target = f"{self.path}.{os.getpid()}.partial" if self.is_local else self.path
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.is_local:
            os.replace(target, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def files(self) -> dict[str, int]:
        """Every file under this folder, recursively: {path relative to it: size}; empty when there is none."""
        return {posixpath.relpath(info.path, self.path): info.size for info in self._file_infos()}

    def _file_infos(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return [info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def folders(self) -> list["Location"]:
        """The folders directly in this one, sorted by name."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted((Location(self.fs, info.path) for info in self.fs.get_file_info(selector)
                       if info.type == pafs.FileType.Directory), key=lambda loc: loc.name)

    def delete(self) -> None:
        """Delete this folder and everything under it (nothing when it is not there)."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def upload(self, local_dir: Union[str, os.PathLike]) -> None:
        """Copy a local folder's files to this folder."""
        self.fs.create_dir(self.path, recursive=True)
        pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, local_dir: Union[str, os.PathLike], wanted: Callable[[str], bool] = lambda name: True) -> Path:
        """Copy this folder's files (those whose relative path is `wanted`) into a local folder; returns it."""
        for name in self.files():
            if wanted(name):
                target = Path(local_dir, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(posixpath.join(self.path, name), str(target), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return Path(local_dir)

    def _cache_path(self, identity: str) -> Path:
        """Where the temp dir keeps a copy of this remote file or folder, keyed by its identity: a changed one is
        copied again."""
        return Path(tempfile.gettempdir(), "suformer-files", hashlib.sha256(identity.encode()).hexdigest()[:16],
                    self.name)

    def local_folder(self) -> Path:
        """This folder as a local path: itself when local, else a copy cached in the temp dir under its identity
        (URI, file names, sizes and modification times: a folder written again with files of the same sizes, as
        a re-run's export is, is a new folder), so each process of a node downloads a changed folder once."""
        if self.is_local:
            return Path(self.path)
        infos = self._file_infos()
        if not infos:
            raise FileNotFoundError(self.uri)
        cached = self._cache_path(json.dumps([self.uri, sorted((i.path, i.size, i.mtime_ns) for i in infos)]))
        if not cached.is_dir():
            partial = self.download(cached.with_name(f"{cached.name}.{os.getpid()}.partial"))
            try:
                os.replace(partial, cached)
            except OSError:  # another process of the node made it first
                shutil.rmtree(partial, ignore_errors=True)
        return cached

    def local_file(self) -> Path:
        """This file as a local path: itself when local, else a copy cached in the temp dir under its identity
        (URI, size, modification time), so each process of a node downloads a changed file once."""
        if self.is_local:
            return Path(self.path)
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.uri)
        cached = self._cache_path(f"{self.uri}|{info.size}|{info.mtime_ns}")
        if not cached.is_file():
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
            partial.write_bytes(self.read_bytes())
            os.replace(partial, cached)
        return cached
