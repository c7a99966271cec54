"""TFRecord framing: how one record sits in a shard, and the errors that name a bad one.

Every record is (TensorFlow's ``tensorflow/core/lib/io/record_writer.cc`` layout)::

    uint64 length          little-endian payload size
    uint32 masked_crc32c(length bytes)
    bytes  payload[length] usually a serialized tf.Example
    uint32 masked_crc32c(payload)

The CRC is CRC-32C (Castagnoli), masked as in LevelDB/TensorFlow: rotated right by 15 bits plus a
constant, because a plain CRC of data that itself contains CRCs is poorly distributed.
"""

from __future__ import annotations

import struct

import crc32c

HEADER_BYTES = 12  # uint64 length + uint32 length CRC
FOOTER_BYTES = 4  # uint32 payload CRC
OVERHEAD_BYTES = HEADER_BYTES + FOOTER_BYTES
_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TensorFlow's masked CRC-32C of ``data`` (hardware accelerated by the ``crc32c`` package)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_header(length: int) -> bytes:
    """The 12 bytes before a payload of ``length`` bytes: length and its masked CRC."""
    length_bytes = struct.pack("<Q", length)
    return length_bytes + _CRC.pack(masked_crc32c(length_bytes))


def encode_footer(payload: bytes | bytearray | memoryview) -> bytes:
    """The 4 bytes after ``payload``: its masked CRC."""
    return _CRC.pack(masked_crc32c(payload))


def decode_header(header: bytes | bytearray | memoryview) -> tuple[int, bool]:
    """Payload length from a 12-byte header and whether the length's CRC matches."""
    length, crc = _HEADER.unpack_from(header)
    return length, masked_crc32c(memoryview(header)[:8]) == crc


def footer_crc(footer: bytes | bytearray | memoryview) -> int:
    """The stored masked payload CRC of a 4-byte footer."""
    return _CRC.unpack_from(footer)[0]


def location(shard: str, record: int, offset: int) -> str:
    """How every error names a record: shard path, record number (0-based) and byte offset."""
    return f"{shard}: record {record} at byte offset {offset}"


class CorruptRecordError(ValueError):
    """A record whose bytes are damaged: CRC mismatch, truncation, or an undecodable payload.

    Attributes ``shard``, ``record`` (0-based number in the shard), ``offset`` (byte offset of the
    record's header in the uncompressed record stream) and ``reason`` say where and what.
    """

    def __init__(self, shard: str, record: int, offset: int, reason: str) -> None:
        super().__init__(f"{location(shard, record, offset)}: {reason}")
        self.shard, self.record, self.offset, self.reason = shard, record, offset, reason

    def __reduce__(self):  # keep the fields when the error crosses a DataLoader worker boundary
        return (type(self), (self.shard, self.record, self.offset, self.reason))


class CorruptRecordWarning(UserWarning):
    """Issued for every record skipped with ``on_corrupt="skip"``."""
