"""Reading TFRecord shards: plain shards through a read-only memory map, compressed ones into a reused buffer.

A plain shard is memory-mapped, so each payload handed out is a ``memoryview`` of the page cache: no copy
at all (the CRC reads it in place). A compressed shard (or ``use_mmap=False``) is read with one
``readinto`` per record into a buffer reused for the next record; the next header comes in the same call.
If the consumer keeps something made from a view (``np.frombuffer``, a slice) past the next record,
the reader notices and reads on into a fresh buffer (a mapping is simply left mapped while such arrays
live), so kept data never changes under it; the view itself is released when the next record is
requested, so a stale view fails loudly instead of showing another record's bytes.

Corruption is never silent: a bad length CRC, a bad payload CRC, a truncated record or a damaged
compressed stream raises :class:`CorruptRecordError` naming shard, record number and byte offset
(``on_corrupt="raise"``), or is skipped with a :class:`CorruptRecordWarning` naming the same and
counted in ``RecordReader.skipped`` (``on_corrupt="skip"``). The length CRC is checked before any
buffer is sized for the payload, and a plain shard's length is checked against the bytes left in the
file, so a corrupt length can never make the reader allocate gigabytes; on a compressed stream the
buffer only grows as decompressed bytes actually arrive.
"""

from __future__ import annotations

import mmap
import os
import warnings
import zlib
from functools import partial
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np

from .compression import detect_compression, open_for_reading
from .features import FeatureError, Spec, WireFormatError, normalize_spec, parse_example
from .framing import (
    FOOTER_BYTES,
    HEADER_BYTES,
    OVERHEAD_BYTES,
    CorruptRecordError,
    CorruptRecordWarning,
    decode_header,
    footer_crc,
    location,
    masked_crc32c,
)

OnCorrupt = Literal["raise", "skip"]
_MIN_BUFFER = 1 << 16
_SKIP_CHUNK = 1 << 20


class MappedShard:
    """A plain shard memory-mapped read-only: ``take`` hands out views of the page cache with no copy.

    It also answers the small ``readinto`` / ``seek`` / ``fileno`` calls the record loop makes for
    headers, so the loop serves files and mappings alike. A shard that shrinks while mapped would fault
    on access (as any mmap reader); shards are written once and then read.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb", buffering=0)
        try:
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise
        if hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_SEQUENTIAL)
        self.view = memoryview(self._mmap)
        self.size = len(self._mmap)
        self.pos = 0

    def fileno(self) -> int:
        return self._file.fileno()

    def seek(self, target: int) -> None:
        self.pos = target

    def readinto(self, view: memoryview) -> int:
        n = max(0, min(len(view), self.size - self.pos))
        view[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def take(self, need: int) -> memoryview:
        """The next ``need`` bytes (fewer at the end of the file) as a view of the mapping."""
        out = self.view[self.pos : self.pos + need]
        self.pos += len(out)
        return out

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass  # arrays made from payload views still use the pages: unmapped when they are freed
        self._file.close()


def _open(path: str, compression: str | None, use_mmap: bool):
    """A ``MappedShard`` for a non-empty plain shard when ``use_mmap``, else an unbuffered reader."""
    if use_mmap and compression is None and os.path.getsize(path) > 0:
        return MappedShard(path)
    return open_for_reading(path, compression)


def is_exported(buffer: bytearray) -> bool:
    """Whether a view of ``buffer`` (or of a view of it, e.g. an array from ``np.frombuffer``) is still alive."""
    try:
        buffer.append(0)  # resizing is refused while any view exists
    except BufferError:
        return True
    buffer.pop()
    return False


class StaleIndexError(ValueError):
    """An index file that does not describe its shard (rebuild it with ``python -m datamodules.tfrecord.index``)."""


class RecordReader:
    """Iterate ``(record_number, byte_offset, payload_view)`` over one shard.

    Args:
        path: the shard.
        compression: ``"auto"`` (by suffix, else by the first bytes), ``"gzip"``, ``"zlib"`` or ``None``.
        verify: check each payload's CRC (the length CRC is always checked).
        on_corrupt: ``"raise"`` or ``"skip"`` (see the module docstring).
        index: optional ``(N, 2)`` int64 array of ``(offset, framed_length)`` rows for the shard
            (see :mod:`datamodules.tfrecord.index`); enables ``start``/``stop``, re-synchronisation
            after a damaged length field, and checks that the index matches the shard.
        start, stop: record range ``[start, stop)`` to read; needs ``index`` unless ``start == 0``.
        warn: issue a warning for each skipped record (False: only count them in ``skipped``).
        use_mmap: read plain shards through a read-only memory map, so payloads are views of the page
            cache and never copied (compressed shards are always read into the reused buffer).

    The yielded ``memoryview`` shows the mapped file or the reader's reusable buffer and is released when
    the next record is requested (using it afterwards raises ``ValueError``; copy with ``bytes(view)`` to
    keep it). Arrays or slices made from it stay valid.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        compression: str | None = "auto",
        *,
        verify: bool = True,
        on_corrupt: OnCorrupt = "raise",
        index: np.ndarray | None = None,
        start: int = 0,
        stop: int | None = None,
        warn: bool = True,
        use_mmap: bool = True,
    ) -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if index is None and start != 0:
            raise ValueError(f"{path}: reading from record {start} needs the shard's index")
        if index is not None:
            stop = len(index) if stop is None else stop
            if not 0 <= start <= stop <= len(index):
                raise ValueError(f"{path}: record range [{start}, {stop}) outside the index's {len(index)} records")
        self.path = os.fspath(path)
        self.compression = detect_compression(path, compression)
        self.verify = verify
        self.on_corrupt = on_corrupt
        self.index = index
        self.start, self.stop = start, stop
        self.warn = warn
        self.use_mmap = use_mmap
        self.skipped = 0  # records skipped as corrupt (on_corrupt="skip")
        self._buffer = bytearray(_MIN_BUFFER)

    def __iter__(self) -> Iterator[tuple[int, int, memoryview]]:
        stream = _open(self.path, self.compression, self.use_mmap)
        try:
            yield from self._records(stream)
        finally:
            stream.close()

    # -- helpers -------------------------------------------------------------------------------

    def _corrupt(self, record: int, offset: int, reason: str, lost: int = 1) -> None:
        """Raise, or warn and count ``lost`` skipped records."""
        error = CorruptRecordError(self.path, record, offset, reason)
        if self.on_corrupt == "raise":
            raise error
        self.skipped += lost
        if self.warn:
            warnings.warn(f"skipped corrupt data: {error}", CorruptRecordWarning, stacklevel=3)

    def _lost_after(self, record: int) -> int:
        """Records lost when reading must stop at ``record``: known from the index, else counted as one."""
        return self.stop - record if self.index is not None else 1

    def _read(self, stream, view: memoryview) -> int:
        """Fill ``view`` as far as the stream allows; returns the bytes read (short only at end of data)."""
        filled, size = 0, len(view)
        while filled < size:
            n = stream.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def _read_growing(self, stream, need: int, plain: bool) -> int:
        """Read ``need`` bytes into the reused buffer; on compressed streams grow it only as data arrives."""
        buffer = self._buffer
        if need <= len(buffer):
            return self._read(stream, memoryview(buffer)[:need])
        if plain:  # the length was checked against the file size, so this allocation is backed by data
            self._buffer = buffer = bytearray(max(need, 2 * len(buffer)))
            return self._read(stream, memoryview(buffer)[:need])
        filled = 0
        while True:
            capacity = min(need, max(2 * len(buffer), _MIN_BUFFER))
            if capacity > len(buffer):
                grown = bytearray(capacity)
                grown[:filled] = memoryview(buffer)[:filled]
                self._buffer = buffer = grown
            n = self._read(stream, memoryview(buffer)[filled:capacity])
            filled += n
            if filled == need or filled < capacity:
                return filled

    def _skip_to(self, stream, current: int, target: int, plain: bool) -> bool:
        """Move from stream position ``current`` to ``target``; False if the data ends first."""
        if plain:
            stream.seek(target)
            return True
        view = memoryview(self._buffer)
        while current < target:
            n = self._read(stream, view[: min(len(view), target - current)])
            if not n:
                return False
            current += n
        return True

    def _check_index(self, record: int, offset: int, length: int) -> None:
        expected_offset, expected_length = (int(v) for v in self.index[record])
        if expected_offset != offset or expected_length != length + OVERHEAD_BYTES:
            raise StaleIndexError(
                f"{self.path}: record {record} is at byte offset {offset} with {length + OVERHEAD_BYTES} "
                f"framed bytes but the index says offset {expected_offset}, {expected_length} bytes: the index "
                "is stale; rebuild it with `python -m datamodules.tfrecord.index`"
            )

    # -- the loop --------------------------------------------------------------------------------

    def _records(self, stream) -> Iterator[tuple[int, int, memoryview]]:
        plain = self.compression is None
        mapped = isinstance(stream, MappedShard)
        size = os.fstat(stream.fileno()).st_size if plain else None
        index, stop = self.index, self.stop
        record = self.start
        if stop is not None and record >= stop:
            return
        offset = int(index[record, 0]) if index is not None else 0
        header = bytearray(HEADER_BYTES)
        try:
            if offset and not self._skip_to(stream, 0, offset, plain):
                self._corrupt(record, offset, "the shard ends before this record (truncated file)", self._lost_after(record))
                return
            have = self._read(stream, memoryview(header))
        except (EOFError, zlib.error) as err:
            self._corrupt(record, offset, f"compressed stream is damaged: {err}", self._lost_after(record))
            return
        while stop is None or record < stop:
            if have == 0:
                if index is not None:
                    self._corrupt(record, offset, f"the shard ends here but its index lists {len(index)} records "
                                  "(truncated file)", self._lost_after(record))
                return
            if have < HEADER_BYTES:
                self._corrupt(record, offset, f"truncated record header: the shard ends {have} bytes into the "
                              f"{HEADER_BYTES}-byte header", self._lost_after(record))
                return
            length, length_ok = decode_header(header)
            if not length_ok:
                rest = "" if index is not None else "; record boundaries are lost, so the rest of the shard is skipped"
                self._corrupt(record, offset, f"length CRC mismatch (header bytes {bytes(header).hex()}): the "
                              f"length field is damaged{rest}")
                if index is None or record + 1 >= stop:
                    return
                # The index says where the next record starts: re-synchronise there.
                record += 1
                target = int(index[record, 0])
                try:
                    if not self._skip_to(stream, offset + HEADER_BYTES, target, plain):
                        self._corrupt(record, target, "the shard ends before this record (truncated file)", self._lost_after(record))
                        return
                    have = self._read(stream, memoryview(header))
                except (EOFError, zlib.error) as err:
                    self._corrupt(record, target, f"compressed stream is damaged: {err}", self._lost_after(record))
                    return
                offset = target
                continue
            if index is not None:
                self._check_index(record, offset, length)
            body = length + FOOTER_BYTES
            if size is not None and offset + HEADER_BYTES + body > size:
                self._corrupt(record, offset, f"truncated record: the header announces a {length}-byte payload but "
                              f"the shard ends {size - offset - HEADER_BYTES} bytes after the header",
                              self._lost_after(record))
                return
            if mapped:
                buffer = stream.take(body + HEADER_BYTES)  # payload, footer, next header: no copy
                got = len(buffer)
            else:
                try:
                    got = self._read_growing(stream, body + HEADER_BYTES, plain)  # payload, footer, next header
                except (EOFError, zlib.error) as err:
                    self._corrupt(record, offset, f"compressed stream is damaged: {err}", self._lost_after(record))
                    return
                buffer = memoryview(self._buffer)
            if got < body:
                self._corrupt(record, offset, f"truncated record: the header announces a {length}-byte payload but "
                              f"the shard ends {got} bytes after the header", self._lost_after(record))
                return
            payload = buffer[:length]
            if self.verify and masked_crc32c(payload) != footer_crc(buffer[length:body]):
                self._corrupt(record, offset, "payload CRC mismatch: the record's bytes are damaged")
            else:
                yield record, offset, payload
            offset += length + OVERHEAD_BYTES
            record += 1
            have = got - body
            header[:have] = buffer[body:got]
            for view in (payload, buffer):
                try:
                    view.release()  # a loop variable still naming the payload now fails loudly if used
                except BufferError:
                    pass  # exported by the consumer: handled just below
            if not mapped and is_exported(self._buffer):  # something made from the view lives on: keep it intact
                self._buffer = bytearray(len(self._buffer))
        if index is not None and stop == len(index) and have:
            raise StaleIndexError(
                f"{self.path}: the shard has more data after record {stop - 1} than its index lists "
                f"({len(index)} records): the index is stale; rebuild it with `python -m datamodules.tfrecord.index`"
            )


def read_records(
    path: str | os.PathLike,
    compression: str | None = "auto",
    verify: bool = True,
    on_corrupt: OnCorrupt = "raise",
    use_mmap: bool = True,
) -> Iterator[memoryview]:
    """Yield every payload of a shard as a ``memoryview``, valid until the next one (see :class:`RecordReader`).

    ``compression``: ``"auto"`` (by suffix ``.gz``/``.zlib``, else by the first bytes), ``"gzip"``,
    ``"zlib"`` or ``None``. See :class:`RecordReader` for ``verify``, ``on_corrupt`` and ``use_mmap``.
    """
    for _, _, payload in RecordReader(path, compression, verify=verify, on_corrupt=on_corrupt, use_mmap=use_mmap):
        yield payload


def parse_record(parse: Callable[[memoryview], Any], payload: memoryview, shard: str, record: int, offset: int) -> Any:
    """Parse a payload; undecodable -> :class:`CorruptRecordError`, spec mismatch -> :class:`FeatureError`, both naming the record."""
    try:
        return parse(payload)
    except WireFormatError as err:
        raise CorruptRecordError(shard, record, offset, f"undecodable payload: {err}") from None
    except FeatureError as err:
        raise FeatureError(err.key, f"{location(shard, record, offset)}: {err}") from None


def read_examples(
    path: str | os.PathLike,
    features: Mapping[str, Spec] | None = None,
    compression: str | None = "auto",
    verify: bool = True,
    on_corrupt: OnCorrupt = "raise",
    parse: Callable[[memoryview], Any] | None = None,
) -> Iterator[Any]:
    """Yield the parsed tf.Examples of a shard (``features``: spec for :func:`parse_example`).

    Errors name shard, record and byte offset; with ``on_corrupt="skip"`` undecodable payloads are skipped
    with a warning like damaged framing. A spec mismatch (:class:`FeatureError`) always raises.
    """
    parse = parse if parse is not None else partial(parse_example, features=normalize_spec(features))
    reader = RecordReader(path, compression, verify=verify, on_corrupt=on_corrupt)
    for record, offset, payload in reader:
        try:
            yield parse_record(parse, payload, reader.path, record, offset)
        except CorruptRecordError as err:
            if on_corrupt == "raise":
                raise
            reader.skipped += 1
            warnings.warn(f"skipped corrupt data: {err}", CorruptRecordWarning, stacklevel=2)
