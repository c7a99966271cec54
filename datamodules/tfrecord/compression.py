"""GZIP / ZLIB compressed shards: detection and streaming (de)compression with ``readinto``.

TensorFlow's ``TFRecordOptions(compression_type="GZIP"|"ZLIB")`` compresses the whole record stream
(not each record), so a compressed shard is read front to back; record offsets in an index of a
compressed shard count bytes of the *decompressed* stream.
"""

from __future__ import annotations

import io
import os
import zlib

from .framing import HEADER_BYTES, decode_header

GZIP, ZLIB = "gzip", "zlib"
_SUFFIXES = {".gz": GZIP, ".gzip": GZIP, ".zlib": ZLIB, ".zz": ZLIB}
_WBITS = {GZIP: 16 + zlib.MAX_WBITS, ZLIB: zlib.MAX_WBITS}  # 16+: gzip header/trailer (RFC 1952)
_CHUNK = 1 << 20


def normalize_compression(compression: str | None) -> str | None:
    """``"gzip"``, ``"zlib"`` or ``None`` from any accepted spelling (TensorFlow's ``"GZIP"``, ``""``)."""
    if compression is None:
        return None
    value = compression.lower()
    if value in ("", "none"):
        return None
    if value in (GZIP, ZLIB):
        return value
    raise ValueError(f"compression must be 'auto', 'gzip', 'zlib' or None, got {compression!r}")


def compression_from_suffix(path: str | os.PathLike) -> str | None:
    """Compression implied by the file name (``.gz``/``.gzip`` -> gzip, ``.zlib``/``.zz`` -> zlib)."""
    return _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())


def detect_compression(path: str | os.PathLike, compression: str | None = "auto") -> str | None:
    """Resolve ``compression="auto"`` for a shard to be read: by suffix, else by looking at its first bytes.

    Shards written by TensorFlow often carry no suffix. A plain shard starts with a header whose length
    CRC verifies (a false match has probability 2**-32); otherwise a gzip magic number (1f 8b) or a zlib
    header (checksum divisible by 31) identifies a compressed one.
    """
    if compression != "auto":
        return normalize_compression(compression)
    by_suffix = compression_from_suffix(path)
    if by_suffix is not None:
        return by_suffix
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or decode_header(head)[1]:
        return None  # empty, too short to tell (the reader reports truncation), or a valid plain header
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return ZLIB
    return None  # not recognisably compressed: the reader reports the bad header with its offset


class InflateReader(io.RawIOBase):
    """Decompressing reader over a binary file with ``readinto`` (so callers can reuse one buffer).

    Handles concatenated gzip members. Raises ``EOFError`` if the compressed data ends before its end
    marker and ``zlib.error`` for damaged data (the gzip trailer CRC is checked by zlib).
    """

    def __init__(self, raw: io.RawIOBase | io.BufferedIOBase, compression: str) -> None:
        super().__init__()
        self._raw = raw
        self._wbits = _WBITS[compression]
        self._inflate = zlib.decompressobj(self._wbits)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        out = memoryview(buffer).cast("B")
        if not len(out):
            return 0
        while True:
            inflate = self._inflate
            if inflate.unconsumed_tail:
                data = inflate.unconsumed_tail
            elif inflate.eof:
                data = inflate.unused_data or self._raw.read(_CHUNK)
                if not data:
                    return 0  # clean end after a complete member
                self._inflate = inflate = zlib.decompressobj(self._wbits)  # next concatenated member
            else:
                data = self._raw.read(_CHUNK)
                if not data:
                    raise EOFError("compressed stream ended before its end-of-stream marker (truncated file)")
            chunk = inflate.decompress(data, len(out))
            if chunk:
                out[: len(chunk)] = chunk
                return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class DeflateWriter(io.RawIOBase):
    """Compressing writer producing a gzip or zlib stream, as TensorFlow's GZIP/ZLIB record writers do."""

    def __init__(self, raw: io.BufferedIOBase, compression: str, level: int = 6) -> None:
        super().__init__()
        self._raw = raw
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, _WBITS[compression])

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - any bytes-like object
        self._raw.write(self._deflate.compress(data))
        return memoryview(data).nbytes

    def close(self) -> None:
        if not self.closed:
            self._raw.write(self._deflate.flush())
            self._raw.close()
        super().close()


def open_for_reading(path: str | os.PathLike, compression: str | None) -> io.RawIOBase:
    """An unbuffered binary reader with ``readinto`` for a plain or compressed shard."""
    raw = open(path, "rb", buffering=0)  # unbuffered: one syscall straight into the caller's buffer
    if compression is None:
        return raw
    return InflateReader(raw, compression)


def open_for_writing(path: str | os.PathLike, compression: str | None, level: int = 6) -> io.IOBase:
    """A binary writer for a plain or compressed shard."""
    raw = open(path, "wb")
    if compression is None:
        return raw
    return DeflateWriter(raw, compression, level)
