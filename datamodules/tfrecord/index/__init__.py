"""Index files: one line ``"offset length"`` per record, beside each shard as ``SHARD.index``.

The format is the ``tfrecord`` PyPI package's: ``offset`` is the byte position of the record's header
and ``length`` the framed size (12-byte header + payload + 4-byte footer), so consecutive lines tile the
shard. An index gives a shard's record count without reading it, record-range splitting across
processes, and random access.

For a GZIP/ZLIB shard the offsets count bytes of the *decompressed* record stream: they still give the
record count and let a reader skip to a record by decompressing up to it, but they are not positions in
the file, and true random access into a compressed shard is impossible (``TFRecordMapDataset`` refuses
compressed shards for that reason).

Build indexes for existing shards with::

    python -m datamodules.tfrecord.index SHARD [SHARD ...] [--verify] [--force]
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from typing import Sequence

import numpy as np

from ..compression import detect_compression, open_for_reading
from ..framing import HEADER_BYTES, OVERHEAD_BYTES, CorruptRecordError, decode_header
from ..reader import RecordReader

INDEX_SUFFIX = ".index"


def index_path(shard: str | os.PathLike) -> str:
    """Where the index of ``shard`` lives: ``SHARD.index``."""
    return os.fspath(shard) + INDEX_SUFFIX


def write_index(path: str | os.PathLike, entries: np.ndarray | Sequence[tuple[int, int]]) -> None:
    """Write ``(offset, framed_length)`` rows as ``"offset length"`` lines."""
    rows = np.asarray(entries, dtype=np.int64).reshape(-1, 2)
    with open(path, "w") as f:
        f.writelines(f"{offset} {length}\n" for offset, length in rows.tolist())


def read_index(path: str | os.PathLike) -> np.ndarray:
    """Read an index file into an ``(N, 2)`` int64 array of ``(offset, framed_length)``, checking it tiles."""
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                offset, length = int(parts[0]), int(parts[1])
            except ValueError:
                raise ValueError(f"{path}, line {line_number}: expected 'offset length', got {line.strip()!r}") from None
            rows.append((offset, length))
    index = np.array(rows, dtype=np.int64).reshape(-1, 2)
    if len(index):
        ends = index[:, 0] + index[:, 1]
        bad = np.flatnonzero((index[:, 1] < OVERHEAD_BYTES) | (index[:, 0] != np.concatenate([[0], ends[:-1]])))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{path}, line {i + 1}: record {i} at offset {index[i, 0]} with length {index[i, 1]} "
                             "does not follow the previous record; not a TFRecord index")
    return index


def scan_shard(shard: str | os.PathLike, compression: str | None = "auto", verify: bool = False) -> np.ndarray:
    """Build a shard's index by walking its framing; ``verify`` also checks every payload CRC.

    A plain shard is walked by seeking past payloads (only headers are read) unless ``verify``;
    a compressed one must be decompressed entirely. Raises :class:`CorruptRecordError` on damage.
    """
    compression = detect_compression(shard, compression)
    shard = os.fspath(shard)
    if verify or compression is not None:
        entries = [(offset, len(payload) + OVERHEAD_BYTES)
                   for _, offset, payload in RecordReader(shard, compression, verify=verify)]
        return np.array(entries, dtype=np.int64).reshape(-1, 2)
    entries = []
    size = os.path.getsize(shard)
    header = bytearray(HEADER_BYTES)
    with open_for_reading(shard, None) as f:
        offset = 0
        while offset < size:
            record = len(entries)
            if f.readinto(header) != HEADER_BYTES:
                raise CorruptRecordError(shard, record, offset, "truncated record header")
            length, ok = decode_header(header)
            if not ok:
                raise CorruptRecordError(shard, record, offset, f"length CRC mismatch (header bytes {header.hex()})")
            if offset + length + OVERHEAD_BYTES > size:
                raise CorruptRecordError(shard, record, offset, f"truncated record: the header announces a {length}-byte "
                                         f"payload but the shard ends {size - offset - HEADER_BYTES} bytes after the header")
            entries.append((offset, length + OVERHEAD_BYTES))
            offset += length + OVERHEAD_BYTES
            f.seek(offset)
    return np.array(entries, dtype=np.int64).reshape(-1, 2)


def load_index(shard: str | os.PathLike) -> np.ndarray | None:
    """The shard's index if ``SHARD.index`` exists, else None."""
    path = index_path(shard)
    return read_index(path) if os.path.exists(path) else None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write ``SHARD.index`` for each given shard."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.tfrecord.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="TFRecord shards (plain, .gz or .zlib)")
    parser.add_argument("--compression", default="auto", help="auto (default), gzip, zlib or none")
    parser.add_argument("--verify", action="store_true", help="also check every payload CRC (reads all data)")
    parser.add_argument("--force", action="store_true", help="overwrite existing index files")
    args = parser.parse_args(argv)
    compression = None if args.compression.lower() == "none" else args.compression
    status = 0
    for shard in args.shards:
        target = index_path(shard)
        if os.path.exists(target) and not args.force:
            print(f"{target} exists, kept (use --force to rebuild)")
            continue
        try:
            entries = scan_shard(shard, compression, verify=args.verify)
        except (CorruptRecordError, EOFError, zlib.error, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        write_index(target, entries)
        print(f"wrote {target} ({len(entries)} records)")
    return status
