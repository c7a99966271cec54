"""Writing TFRecord shards (plain, GZIP or ZLIB) with an index file beside each, one shard or a sharded set."""

from __future__ import annotations

import os
from contextlib import ExitStack
from types import TracebackType
from typing import Iterable

from google.protobuf.message import Message

from .compression import compression_from_suffix, normalize_compression, open_for_writing
from .framing import OVERHEAD_BYTES, encode_footer, encode_header
from .index import index_path, write_index


class TFRecordWriter:
    """Write records to one shard; on ``close()`` also write ``SHARD.index`` (see :mod:`.index`).

    Args:
        path: the shard to create (overwritten if it exists).
        compression: ``"auto"`` (gzip for ``.gz``, zlib for ``.zlib``, else none), ``"gzip"``, ``"zlib"``
            or ``None``. Output matches TensorFlow's ``TFRecordWriter`` with the same option: the framing
            is byte-identical for plain shards; compressed ones decompress to the same bytes.
        write_index: write the index file on close (offsets count uncompressed bytes, see :mod:`.index`).
        level: zlib compression level for compressed shards.

    Use as a context manager; ``write`` takes serialized bytes or a protobuf message (serialized
    deterministically, i.e. with map keys sorted, so equal examples give equal bytes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        compression: str | None = "auto",
        write_index: bool = True,
        level: int = 6,
    ) -> None:
        self.path = os.fspath(path)
        self.compression = compression_from_suffix(path) if compression == "auto" else normalize_compression(compression)
        self._write_index = write_index
        self._file = open_for_writing(self.path, self.compression, level)
        self._entries: list[tuple[int, int]] = []
        self._offset = 0

    @property
    def num_records(self) -> int:
        """Records written so far."""
        return len(self._entries)

    def write(self, record: bytes | bytearray | memoryview | Message) -> None:
        """Append one record: framing, payload, CRCs."""
        if isinstance(record, Message):
            record = record.SerializeToString(deterministic=True)
        elif not isinstance(record, (bytes, bytearray, memoryview)):
            raise TypeError(f"{self.path}: records are bytes or protobuf messages, got {type(record).__name__}")
        length = memoryview(record).nbytes
        write = self._file.write
        write(encode_header(length))
        write(record)
        write(encode_footer(record))
        self._entries.append((self._offset, length + OVERHEAD_BYTES))
        self._offset += length + OVERHEAD_BYTES

    def close(self) -> None:
        """Flush the shard and write its index."""
        if self._file.closed:
            return
        self._file.close()
        if self._write_index:
            write_index(index_path(self.path), self._entries)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_SHARD_SUFFIX = {None: "", "gzip": ".gz", "zlib": ".zlib"}


def shard_paths(out: str, num_shards: int, compression: str | None = None) -> list[str]:
    """``{out}-00000-of-00016.tfrecord`` (``.gz`` / ``.zlib`` when compressed) for each shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    suffix = ".tfrecord" + _SHARD_SUFFIX[normalize_compression(compression)]
    return [f"{out}-{i:05d}-of-{num_shards:05d}{suffix}" for i in range(num_shards)]


def write_sharded(
    records: Iterable[bytes | bytearray | memoryview | Message],
    out: str,
    num_shards: int,
    compression: str | None = None,
) -> list[str]:
    """Deal ``records`` round-robin over ``num_shards`` shards, each with its index; returns the shard paths.

    Round-robin as the TF OD API's ``open_sharded_output_tfrecords``: shard sizes differ by at most one.
    """
    paths = shard_paths(out, num_shards, compression)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with ExitStack() as stack:
        compression = normalize_compression(compression)
        writers = [stack.enter_context(TFRecordWriter(p, compression=compression)) for p in paths]
        for i, record in enumerate(records):
            writers[i % num_shards].write(record)
    return paths
