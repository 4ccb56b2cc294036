"""A reader of TensorFlow checkpoints (the tensor-bundle format of `model.ckpt.index` + `model.ckpt.data-*`),
so the released bert4keras checkpoints load without installing TensorFlow (a 600 MB dependency for one read).

The format, as TensorFlow writes it (tensorflow/core/util/tensor_bundle, tensorflow/core/lib/io/table):
- `.index` is a LevelDB-style sorted table: data blocks of prefix-compressed (key, value) entries, an index block
  of block handles, and a 48-byte footer ending in the table magic number. The key "" holds a BundleHeaderProto
  (number of data shards, endianness); every other key is a tensor name whose value is a BundleEntryProto
  (dtype, shape, shard id, byte offset and size in that shard).
- `.data-NNNNN-of-MMMMM` shards hold each tensor's raw bytes in the header's byte order.
Only what checkpoints of dense variables use is read; a sliced (partitioned) variable is an error that names it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48
_BLOCK_TRAILER_BYTES = 5  # compression type (1 byte) + masked crc32c (4 bytes)
# TensorFlow's DataType enum -> numpy dtype (types.proto); strings hold object-graph metadata, not weights.
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 9: "int64", 10: "bool",
           14: "bfloat16", 19: "float16", 17: "uint16", 22: "uint32", 23: "uint64"}
_DT_STRING = 7


class TFCheckpointError(ValueError):
    """A file that is not a readable TensorFlow checkpoint; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    sliced: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, value) pairs of a serialised protobuf message: ints for varints/fixed, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _entry(value: bytes) -> TensorEntry:
    fields = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0, "sliced": False}
    for field, v in _proto_fields(value):
        if field == 1:
            fields["dtype"] = v
        elif field == 2:  # TensorShapeProto: repeated Dim (field 2) with size (field 1)
            dims = [dict(_proto_fields(dim)).get(1, 0) for f, dim in _proto_fields(v) if f == 2]
            fields["shape"] = tuple(dims)
        elif field == 3:
            fields["shard"] = v
        elif field == 4:
            fields["offset"] = v
        elif field == 5:
            fields["size"] = v
        elif field == 7:
            fields["sliced"] = True
    return TensorEntry(**fields)


class TFCheckpoint:
    """`TFCheckpoint(prefix)`: `names()` lists the weight tensors, `read(name)` returns one as a numpy array.
    The prefix is what TensorFlow was given when saving (e.g. `.../bert_model.ckpt`), without `.index`."""

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        self.index_file = Path(f"{self.prefix}.index")
        if not self.index_file.is_file():
            raise TFCheckpointError(f"{self.index_file}: not found (the checkpoint prefix is the name without .index)")
        table = self._read_table(self.index_file.read_bytes())
        header = dict(_proto_fields(table.pop(b"", b"")))
        self.num_shards = header.get(1, 1)
        if header.get(2, 0) != 0:
            raise TFCheckpointError(f"{self.index_file}: a big-endian checkpoint; only little-endian ones are read")
        self.entries = {key.decode("utf-8"): _entry(value) for key, value in table.items()}

    def _read_table(self, data: bytes) -> dict[bytes, bytes]:
        where = self.index_file
        if len(data) < _FOOTER_BYTES:
            raise TFCheckpointError(f"{where}: {len(data)} bytes, too short for a checkpoint index")
        footer = data[-_FOOTER_BYTES:]
        low, high = struct.unpack_from("<II", footer, _FOOTER_BYTES - 8)
        if (high << 32 | low) != _TABLE_MAGIC:
            raise TFCheckpointError(f"{where}: not a TensorFlow checkpoint index (bad magic number)")
        _, pos = _varint(footer, 0)  # metaindex handle: unused by tensor bundles
        _, pos = _varint(footer, pos)
        index_offset, pos = _varint(footer, pos)
        index_size, _ = _varint(footer, pos)
        table = {}
        for _, handle in self._block_entries(data, index_offset, index_size):
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
            table.update(self._block_entries(data, offset, size))
        return table

    def _block_entries(self, data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
        if offset + size + _BLOCK_TRAILER_BYTES > len(data):
            raise TFCheckpointError(f"{self.index_file}: truncated (a block ends past the end of the file)")
        if data[offset + size] != 0:
            raise TFCheckpointError(f"{self.index_file}: compressed table blocks are not supported "
                                    f"(compression type {data[offset + size]}); TensorFlow writes bundles uncompressed")
        block = data[offset:offset + size]
        num_restarts = struct.unpack_from("<I", block, size - 4)[0]
        end = size - 4 - 4 * num_restarts
        entries, pos, key = [], 0, b""
        while pos < end:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_len, pos = _varint(block, pos)
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            entries.append((key, block[pos:pos + value_len]))
            pos += value_len
        return entries

    def names(self) -> list[str]:
        """Names of the numeric tensors (string entries, e.g. TF2's object graph, are metadata)."""
        return sorted(n for n, e in self.entries.items() if e.dtype != _DT_STRING)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise TFCheckpointError(f"{self.index_file}: no tensor named {name!r}")
        e = self.entries[name]
        if e.sliced:
            raise TFCheckpointError(f"{self.index_file}: {name} is a partitioned (sliced) variable; not supported")
        if e.dtype not in _DTYPES:
            raise TFCheckpointError(f"{self.index_file}: {name} has TensorFlow dtype {e.dtype}, not a numeric type")
        dtype = _numpy_dtype(_DTYPES[e.dtype])
        if e.size != dtype.itemsize * int(np.prod(e.shape, dtype=np.int64)):
            raise TFCheckpointError(f"{self.index_file}: {name}: {e.size} bytes for shape {e.shape}")
        shard = Path(f"{self.prefix}.data-{e.shard:05d}-of-{self.num_shards:05d}")
        try:
            with open(shard, "rb") as f:
                f.seek(e.offset)
                raw = f.read(e.size)
        except FileNotFoundError:
            raise TFCheckpointError(f"{shard}: not found (holds {name})") from None
        if len(raw) != e.size:
            raise TFCheckpointError(f"{shard}: truncated ({name} needs bytes {e.offset}..{e.offset + e.size})")
        array = np.frombuffer(raw, dtype=dtype).reshape(e.shape)
        if _DTYPES[e.dtype] == "bfloat16":  # numpy has no bfloat16: its 16 bits are a float32's high half
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.copy()


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


def find_checkpoint(folder) -> Path | None:
    """The checkpoint prefix in a release directory (`bert_model.ckpt`, `model.ckpt`, ...), or None; a `checkpoint`
    state file names the one to use when there are several."""
    folder = Path(folder)
    state = folder / "checkpoint"
    if state.is_file():
        for line in state.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = line.split(":", 1)[1].strip().strip('"')
                if Path(folder / f"{name}.index").is_file():
                    return folder / name
    found = sorted(folder.glob("*.index"))
    if len(found) > 1:
        raise TFCheckpointError(f"{folder}: several checkpoints ({', '.join(p.name for p in found)}) and no "
                                "`checkpoint` file naming one")
    return found[0].with_suffix("") if found else None
