"""MXNet RecordIO (``train.rec`` + ``train.idx``) read without MXNet: the format of MS1M, Glint360K, WebFace.

The format (dmlc-core ``recordio.h``, MXNet ``python/mxnet/recordio.py``), all little-endian:

* ``.idx``: text, one line per record, ``key<TAB>byte offset``, in the order the records were written.
* ``.rec``: every record is one or more chunks, each ``uint32 magic = 0xced7230a``, ``uint32 lrec``
  (``cflag = lrec >> 29``, ``length = lrec & (2**29 - 1)``), ``length`` bytes, zero padding to a multiple
  of 4. A payload that holds the magic word at a 4-byte-aligned offset is cut there by the writer (so a
  reader scanning for the magic never finds it inside a payload): ``cflag`` 1 starts a record, 2 continues
  it, 3 ends it, 0 is a whole record; the reader joins the chunks with the magic word put back between them.
* a payload (``mx.recordio.pack``) is the 24-byte ``IRHeader`` ``struct '<IfQQ'`` (``flag``, ``label``,
  ``id``, ``id2``), then, if ``flag > 0``, ``flag`` float32 values that are the label (the header's
  ``label`` field is then unused), then the encoded image.

Two layouts, told apart by record 0:

* with a header record (MS1M / Glint360K, insightface's ``RecBuilder`` / ``face2rec2.py``): record 0 has
  ``flag > 0``, label ``[first identity record, one past the last record]`` and no image (nothing after the
  labels); the images are keys ``1 .. label[0] - 1``; keys ``label[0] .. label[1] - 1`` are one record per
  identity whose label is the ``[start, end)`` range of that identity's image keys (so
  ``num_identities = label[1] - label[0]``);
* without (``im2rec`` style): every key of the ``.idx`` is an image, in ``.idx`` order. Key 0 may be an image
  with an array label (``flag > 0``: ``im2rec --pack-label``, face2rec2's ``[label, aligned]``); it carries image
  bytes, so it is no header record. insightface's ``arcface_torch/dataset.py`` ``MXFaceDataset`` looks at
  ``flag`` alone and takes such an image for the header: the pack then opens empty or with the wrong keys.

Reading is random access through the ``.idx`` offsets with ``os.pread`` on a descriptor opened lazily in
each process (a DataLoader worker forked from the main process opens its own), never the whole file in
memory. Each record is fetched with one read of its extent up to the next indexed offset. Damaged data
raises :class:`RecordIOError` naming the file, key and byte offset: a wrong magic word, an invalid chunk
flag, a record or chunk running past the end of the file or into the next indexed record, an offset that
is not a record start, a payload shorter than its header. No loop reads without advancing, so nothing hangs.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_MASK = (1 << 29) - 1
CHUNK_HEADER = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_FIRST_READ_CAP = 4 << 20  # bytes fetched by the first read of a record; larger records take a second read


class RecordIOError(ValueError):
    """A damaged RecordIO file or index; ``path``, ``key``, ``offset`` (bytes) and ``reason`` say where and what.

    Built with one argument it is a ready message (how a DataLoader re-raises a worker's error); the fields
    are then ``None`` except ``reason``.
    """

    def __init__(self, path: str, key: int | None = None, offset: int | None = None, reason: str | None = None) -> None:
        if reason is None:
            super().__init__(str(path))
            self.path, self.key, self.offset, self.reason = None, None, None, str(path)
            return
        where = str(path)
        if key is not None:
            where += f": key {key}"
        if offset is not None:
            where += f" at byte offset {offset}"
        super().__init__(f"{where}: {reason}")
        self.path, self.key, self.offset, self.reason = str(path), key, offset, reason

    def __reduce__(self):  # keep the fields when the error crosses a DataLoader worker boundary
        return (type(self), (self.path, self.key, self.offset, self.reason))


class IRHeader(NamedTuple):
    """MXNet's image-record header. ``label`` is a float, or a float32 array of ``flag`` values when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def _split_payload(payload: bytes | bytearray | memoryview) -> tuple[IRHeader, memoryview]:
    view = memoryview(payload)
    if len(view) < IR_HEADER.size:
        raise ValueError(f"payload of {len(view)} bytes is shorter than the {IR_HEADER.size}-byte IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(view)
    start = IR_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(view):
            raise ValueError(f"IRHeader flag {flag} announces {flag} float32 labels ({4 * flag} bytes) but only "
                             f"{len(view) - start} bytes follow the header")
        label = np.frombuffer(view[start:end], dtype="<f4").astype(np.float32)
        start = end
    return IRHeader(flag, label, id_, id2), view[start:]


def unpack_record(payload: bytes | bytearray | memoryview, where: str = "record") -> tuple[IRHeader, memoryview]:
    """Split a record payload into its :class:`IRHeader` and the bytes after it (the encoded image), as ``mx.recordio.unpack``.

    Raises:
        ValueError: the payload is shorter than its header and the ``flag`` labels it announces (names ``where``).
    """
    try:
        return _split_payload(payload)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def pack_record(header: IRHeader, data: bytes = b"") -> bytes:
    """Payload bytes of ``header`` + ``data``, as ``mx.recordio.pack`` writes them.

    A ``label`` that is a sequence is stored as ``flag = len(label)`` float32 values after the header (the
    header's own label field is then 0.0), whatever ``header.flag`` says.
    """
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IR_HEADER.pack(header.flag, float(label), header.id, header.id2) + bytes(data)
    values = np.asarray(label, dtype="<f4").ravel()
    return IR_HEADER.pack(len(values), 0.0, header.id, header.id2) + values.tobytes() + bytes(data)


def frame_record(payload: bytes | bytearray | memoryview) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` writes for one payload: chunks cut at aligned magic words, padded."""
    payload = bytes(payload)
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"a RecordIO payload holds at most {LENGTH_MASK} bytes, got {len(payload)}")
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == MAGIC_BYTES]
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(payload[start:cut])
        start = cut + 4
    pieces.append(payload[start:])
    out = bytearray()
    for n, piece in enumerate(pieces):
        cflag = 0 if len(pieces) == 1 else (1 if n == 0 else (3 if n == len(pieces) - 1 else 2))
        out += CHUNK_HEADER.pack(MAGIC, (cflag << 29) | len(piece)) + piece + bytes(-len(piece) % 4)
    return bytes(out)


def write_recordio(rec_path: str | os.PathLike, records: Iterable[tuple[int, bytes]], idx_path: str | os.PathLike | None = None) -> None:
    """Write ``(key, payload)`` records to ``rec_path`` and their offsets to the ``.idx``, as ``MXIndexedRecordIO(..., 'w')``.

    Payloads are usually :func:`pack_record` results. Refuses to overwrite an existing file (nothing the user
    has is lost) and a repeated key.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    for path in (rec_path, idx_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: not overwriting it")
    seen: set[int] = set()
    with open(rec_path, "xb") as rec, open(idx_path, "x", encoding="ascii", newline="\n") as idx:
        for key, payload in records:
            key = int(key)
            if key in seen:
                raise ValueError(f"{rec_path}: key {key} written twice")
            seen.add(key)
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(frame_record(payload))


def _parse_index_fast(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectorised parse of a well-formed ``.idx`` (only ``digits<TAB>digits<LF>`` lines); ``None`` sends it to the careful path."""
    if data.translate(None, b"0123456789\t\n"):
        return None
    body = data if data.endswith(b"\n") else data + b"\n"
    raw = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    tabs = np.flatnonzero(raw == 9)
    starts = np.concatenate([[0], ends[:-1] + 1])
    # Exactly one tab per line with a digit on each side: tabs and lines pair up one to one.
    if len(tabs) != len(ends) or not (np.all(tabs > starts) and np.all(tabs < ends - 1)):
        return None
    values = np.fromstring(body, dtype=np.int64, sep=" ")  # text mode: whitespace-separated integers
    if len(values) != 2 * len(ends) or (values >= 10**18).any():  # numbers past int64 saturate: check carefully
        return None
    return values[0::2].copy(), values[1::2].copy()


def read_index(idx_path: str | os.PathLike, rec_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` int64 arrays of a ``.idx`` file, in file order.

    Args:
        idx_path: the ``key<TAB>offset`` text file.
        rec_size: size of the ``.rec`` in bytes; offsets at or past it are refused.

    Raises:
        RecordIOError: a line that is not two non-negative integers, a repeated key, an offset that is not a
            multiple of 4 (records are 4-byte aligned) or lies past the end of the ``.rec``; the message names
            the ``.idx`` file, its line, the key and the offset.
    """
    idx_path = str(idx_path)
    data = Path(idx_path).read_bytes()
    parsed = _parse_index_fast(data)
    if parsed is not None:
        keys, offsets = parsed
    else:  # other whitespace, blank lines, or an error to locate: line by line
        lines = data.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        keys = np.empty(len(lines), dtype=np.int64)
        offsets = np.empty(len(lines), dtype=np.int64)
        for n, line in enumerate(lines):
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
                if key < 0 or offset < 0:
                    raise ValueError
                keys[n], offsets[n] = key, offset
            except (ValueError, OverflowError):
                raise RecordIOError(idx_path, None, None, f"line {n + 1}: expected 'key<TAB>offset' with two non-negative "
                                    f"integers, got {line[:80]!r}") from None
    order = np.argsort(keys, kind="stable")
    repeated = np.flatnonzero(np.diff(keys[order]) == 0)
    if len(repeated):
        first, second = sorted(order[repeated[0] : repeated[0] + 2])
        raise RecordIOError(idx_path, int(keys[first]), None, f"listed twice, on lines {first + 1} and {second + 1}")
    bad = np.flatnonzero(offsets % 4)
    if len(bad):
        n = int(bad[0])
        raise RecordIOError(idx_path, int(keys[n]), int(offsets[n]), f"line {n + 1}: offset is not a multiple of 4, "
                            "so it cannot be the start of a record")
    if rec_size is not None:
        bad = np.flatnonzero(offsets + CHUNK_HEADER.size > rec_size)
        if len(bad):
            n = int(bad[0])
            raise RecordIOError(idx_path, int(keys[n]), int(offsets[n]), f"line {n + 1}: offset lies past the end of the "
                                f".rec file ({rec_size} bytes)")
    return keys, offsets


class IndexedRecordIO:
    """Random access to the records of a ``.rec`` through its ``.idx``, as ``mx.recordio.MXIndexedRecordIO(idx, rec, 'r')``.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its index; default ``rec_path`` with suffix ``.idx``.

    Attributes:
        keys: ``(N,)`` int64 keys in ``.idx`` order (``MXIndexedRecordIO.keys``).
        offsets: ``(N,)`` int64 byte offsets, same order.

    The file descriptor is opened on first read in each process (tracked by pid), so the object can be
    created before DataLoader workers fork or be pickled to spawned ones; :meth:`close` closes it.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path is not None else str(Path(rec_path).with_suffix(".idx"))
        for path in (self.rec_path, self.idx_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"RecordIO file {path} does not exist")
        self.size = os.path.getsize(self.rec_path)
        self.keys, self.offsets = read_index(self.idx_path, self.size)
        self._sorted = None if np.all(np.diff(self.keys) > 0) else np.argsort(self.keys, kind="stable")
        # Where each record's bytes may extend to: the next larger indexed offset, or the end of the file.
        starts = np.sort(self.offsets)
        starts = np.append(starts[np.concatenate([[True], np.diff(starts) > 0])], self.size)  # distinct, ascending
        self._ends = starts[np.searchsorted(starts, self.offsets, side="right")]
        self._fd, self._pid = -1, -1

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return self.position(key, missing_ok=True) is not None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_pid"] = -1, -1
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's file descriptor (reopened by the next read)."""
        if getattr(self, "_fd", -1) >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1

    def _descriptor(self) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptor shares its file position and lifetime
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return self._fd

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` in :attr:`keys` (``.idx`` order), -1 where a key is absent (vectorised)."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(self.keys) == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        i = np.minimum(np.searchsorted(self.keys, keys, sorter=self._sorted), len(self.keys) - 1)
        rows = i if self._sorted is None else self._sorted[i]
        return np.where(self.keys[rows] == keys, rows, -1)

    def position(self, key: int, missing_ok: bool = False) -> int | None:
        """Row of ``key`` in :attr:`keys` (``.idx`` order); ``None`` if absent and ``missing_ok``, else ``KeyError``."""
        row = int(self.positions(np.array([key]))[0])
        if row >= 0:
            return row
        if missing_ok:
            return None
        raise KeyError(f"{self.idx_path}: no record with key {key}")

    def read(self, key: int) -> bytes | memoryview:
        """The payload of record ``key`` (chunks joined), as ``MXIndexedRecordIO.read_idx``."""
        return self.read_at(self.position(key))

    def read_at(self, row: int) -> bytes | memoryview:
        """The payload of the record on row ``row`` of the ``.idx`` (a view of a fresh buffer for one-chunk records)."""
        key, offset, end = int(self.keys[row]), int(self.offsets[row]), int(self._ends[row])
        fd = self._descriptor()
        wanted = min(max(end - offset, CHUNK_HEADER.size), _FIRST_READ_CAP)
        buf = os.pread(fd, wanted, offset)
        # One system call per record: the size found when the index was read holds unless a read comes up short
        # (the file shrank since), and then the current size names the damage precisely.
        size = self.size if len(buf) == wanted else os.fstat(fd).st_size
        parts: list[bytes | memoryview] = []
        pos, first = 0, True  # pos: position of the current chunk, relative to offset
        while True:
            at = offset + pos
            if at + CHUNK_HEADER.size > size:
                raise RecordIOError(self.rec_path, key, offset, f"truncated: the file ends at byte {size}, inside the "
                                    f"chunk header expected at byte {at}")
            if pos + CHUNK_HEADER.size > len(buf):
                buf += os.pread(fd, pos + CHUNK_HEADER.size - len(buf), offset + len(buf))
            magic, lrec = CHUNK_HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                what = "is not the start of a record" if first else "holds a damaged chunk"
                raise RecordIOError(self.rec_path, key, offset, f"bad magic 0x{magic:08x} at byte {at} (expected "
                                    f"0x{MAGIC:08x}): the offset {what}")
            cflag, length = lrec >> 29, lrec & LENGTH_MASK
            if cflag > 3:
                raise RecordIOError(self.rec_path, key, offset, f"invalid chunk flag {cflag} at byte {at}")
            if first and cflag in (2, 3):
                raise RecordIOError(self.rec_path, key, offset, f"the offset points into the middle of a multi-part "
                                    f"record (chunk flag {cflag}), not at its start")
            if not first and cflag in (0, 1):
                raise RecordIOError(self.rec_path, key, offset, f"multi-part record interrupted at byte {at} by a new "
                                    f"record (chunk flag {cflag})")
            start, stop = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
            if offset + stop > size:
                raise RecordIOError(self.rec_path, key, offset, f"truncated: the chunk at byte {at} holds {length} bytes, "
                                    f"past the end of the file ({size} bytes)")
            if offset + stop > end and end < self.size:
                raise RecordIOError(self.rec_path, key, offset, f"the record runs to byte {offset + stop}, past the start "
                                    f"of the next indexed record at byte {end}: the record or the index is damaged")
            if stop > len(buf):
                buf += os.pread(fd, stop - len(buf), offset + len(buf))
            if cflag == 0:
                return memoryview(buf)[start:stop]
            parts.append(memoryview(buf)[start:stop])
            if cflag == 3:
                return b"".join(parts)
            parts.append(MAGIC_BYTES)
            pos = stop + (-length % 4)
            first = False

    def unpack_at(self, row: int) -> tuple[IRHeader, memoryview]:
        """:class:`IRHeader` and image bytes of the record on ``row``; a payload too short for its header is a :class:`RecordIOError`."""
        try:
            return _split_payload(self.read_at(row))
        except RecordIOError:
            raise
        except ValueError as err:
            raise RecordIOError(self.rec_path, int(self.keys[row]), int(self.offsets[row]), str(err)) from None

    def header_at(self, row: int) -> IRHeader:
        """The :class:`IRHeader` of the record on ``row``, reading only its first bytes (for labels, not pixels).

        The framing is checked as far as the header tells it (magic, flag, the length within the file and before
        the next indexed record); a multi-part record, or one that fails a check, is read whole by
        :meth:`unpack_at`, which raises the precise error.
        """
        offset, end = int(self.offsets[row]), int(self._ends[row])
        head = os.pread(self._descriptor(), 64, offset)
        if len(head) >= CHUNK_HEADER.size + IR_HEADER.size:
            magic, lrec = CHUNK_HEADER.unpack_from(head)
            length = lrec & LENGTH_MASK
            flag = IR_HEADER.unpack_from(head, CHUNK_HEADER.size)[0]
            need = CHUNK_HEADER.size + IR_HEADER.size + 4 * flag
            if (magic == MAGIC and lrec >> 29 == 0 and IR_HEADER.size + 4 * flag <= length
                    and offset + CHUNK_HEADER.size + length <= min(end, self.size)):
                if need > len(head):
                    head = os.pread(self._descriptor(), need, offset)
                return _split_payload(memoryview(head)[CHUNK_HEADER.size : need])[0]
        return self.unpack_at(row)[0]

    def read_header(self, key: int) -> IRHeader:
        """The :class:`IRHeader` of record ``key`` (see :meth:`header_at`)."""
        return self.header_at(self.position(key))

    def where(self, row: int) -> str:
        """How errors name the record on ``row``: file, key and byte offset."""
        return f"{self.rec_path}: key {int(self.keys[row])} at byte offset {int(self.offsets[row])}"


def class_of(label: float | np.ndarray, where: str = "record") -> int:
    """The integer class of an image record's label; an array label gives its first value (as ``MXFaceDataset``).

    Raises:
        ValueError: an empty array, or a value that is not a non-negative integer (insightface would silently
            truncate 2.5 to 2; here it is an error naming ``where``).
    """
    if isinstance(label, np.ndarray):
        if label.size == 0:
            raise ValueError(f"{where}: empty label array")
        label = label.flat[0]
    value = float(label)
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{where}: label {value} is not a non-negative integer class id")
    return int(value)


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from insightface's ``property`` file (``"93431,112,112"``)."""
    text = Path(path).read_text().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    return num_classes, height, width


class RecordIODataset:
    """Map-style face-recognition dataset over an insightface RecordIO pair: ``dataset[i] -> (image, label)``.

    ``image`` is what ``decode`` makes of the record's encoded image (its bytes without a decoder), passed through
    ``transform`` if given; ``label`` an ``int``. This module is the format only and decodes nothing itself: the face
    family passes the DataModules' one decoder, :func:`datamodules.images.decode_image` (Pillow: libjpeg-turbo's
    accurate integer IDCT and "fancy" chroma upsampling, the mode OpenCV's ``imdecode`` uses inside
    ``mx.image.imdecode``), which gives ``(H, W, 3)`` uint8 RGB whose pixels equal MXNet's: every golden image
    hashes to the ``rgb_sha256`` of ``values.json``. Greyscale and palette images become RGB (MXNet's default
    ``flag=1`` also gives 3 channels); a rare CMYK JPEG may differ, as Pillow's CMYK->RGB conversion is not OpenCV's.

    Item ``i`` is the i-th image key: keys ``1 .. header0[0] - 1`` with a header record, else every key in
    ``.idx`` order, as insightface's ``MXFaceDataset``. Record 0 is the header record when its ``flag > 0`` and it
    holds no image bytes after its labels (``MXFaceDataset`` checks the ``flag`` only, and so takes an ``im2rec``
    image with an array label at key 0 for a header); where the reference would fail (no record 0: MXNet raises
    ``KeyError``), every key is an image here.

    Args:
        rec_path: ``train.rec``.
        idx_path: its index; default beside it with suffix ``.idx``.
        transform: called on the decoded image (e.g. an albumentations pipeline wrapped to take and return an array
            or tensor); ``None`` returns the array.
        decode: ``(encoded bytes, where) -> image``, ``where`` naming the file, key and byte offset for its errors
            (e.g. :func:`datamodules.images.decode_image`); ``None`` gives the encoded bytes.

    Attributes:
        header0: ``(first identity key, one past the last key)`` from the header record's label, or ``None``
            without one.
        image_keys: ``(N,)`` int64 keys of the images, item order.
        num_identities: ``header0[1] - header0[0]`` with a header record; else the ``property`` file's count if there
            is one beside the ``.rec``; else ``None`` (count the classes with :meth:`labels`).

    Raises:
        RecordIOError: the header layout lists an image or identity key that is not in the ``.idx``, a header record's
            label is not a key range, or record 0 is damaged.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
        *,
        decode: Callable[[bytes | memoryview, str], Any] | None = None,
    ) -> None:
        self.records = IndexedRecordIO(rec_path, idx_path)
        self.transform, self.decode = transform, decode
        self.header0: tuple[int, int] | None = None
        records = self.records
        zero = records.position(0, missing_ok=True)
        header, data = records.unpack_at(zero) if zero is not None else (None, b"")
        if header is not None and header.flag > 0 and len(data) == 0:  # labels and no image: the header record
            label = np.atleast_1d(header.label)
            if label.size < 2 or not 1 <= label[0] <= label[1]:
                raise RecordIOError(records.rec_path, 0, int(records.offsets[zero]), f"record 0 holds labels and no "
                                    f"image, so it is the header record, but its label {label.tolist()} is not "
                                    "[first identity key, one past the last key]")
            self.header0 = (int(label[0]), int(label[1]))
            self.image_keys = np.arange(1, self.header0[0], dtype=np.int64)
            rows = records.positions(np.arange(1, self.header0[1], dtype=np.int64))
            if (rows < 0).any():
                missing = 1 + int(np.flatnonzero(rows < 0)[0])
                raise RecordIOError(records.idx_path, missing, None, f"listed by the header record (images 1..{self.header0[0] - 1}, "
                                    f"identities {self.header0[0]}..{self.header0[1] - 1}) but not in the index")
            self._rows = rows[: len(self.image_keys)]
            self.num_identities: int | None = self.header0[1] - self.header0[0]
        else:
            self.image_keys = records.keys.copy()
            self._rows = np.arange(len(records.keys), dtype=np.int64)
            prop = Path(records.rec_path).with_name("property")
            self.num_identities = read_property(prop)[0] if prop.is_file() else None

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, i: int) -> tuple[IRHeader, memoryview, str]:
        """Header, encoded image bytes and the record's name (file, key, offset) of item ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        row = int(self._rows[i % n])
        header, data = self.records.unpack_at(row)
        return header, data, self.records.where(row)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        header, data, where = self.read(i)
        label = class_of(header.label, where)
        image = self.decode(data, where) if self.decode is not None else bytes(data)
        return (self.transform(image) if self.transform is not None else image), label

    def label(self, i: int) -> int:
        """The class of item ``i``, reading only the start of its record."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        row = int(self._rows[i % n])
        return class_of(self.records.header_at(row).label, self.records.where(row))

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 classes of all items (the first bytes of every record: for sampling or counting classes)."""
        return np.fromiter((self.label(i) for i in range(len(self))), dtype=np.int64, count=len(self))

    def identity_ranges(self) -> np.ndarray:
        """``(num_identities, 2)`` int64 ``[start, end)`` image-key ranges from the identity records (header layout only)."""
        if self.header0 is None:
            raise ValueError(f"{self.records.rec_path} has no header record, so no identity records")
        ranges = np.empty((self.header0[1] - self.header0[0], 2), dtype=np.int64)
        for n, key in enumerate(range(*self.header0)):
            row = self.records.position(key)
            label = np.atleast_1d(self.records.header_at(row).label)
            if label.size < 2:
                raise RecordIOError(self.records.rec_path, key, int(self.records.offsets[row]),
                                    f"identity record label {label.tolist()} is not a [start, end) key range")
            ranges[n] = label[:2]
        return ranges
