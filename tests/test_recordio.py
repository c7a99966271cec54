"""MXNet RecordIO without MXNet: the golden files MXNet 1.9.1 wrote (../shared/golden/insightface), damaged copies, workers.

Expected values come from ``values.json`` (written with MXNet's own reader and insightface's ``MXFaceDataset``);
pixel hashes are sha256 of the decoded ``(112, 112, 3)`` uint8 RGB array.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import decode_image
from datamodules.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IndexedRecordIO,
    IRHeader,
    RecordIODataset,
    RecordIOError,
    class_of,
    frame_record,
    pack_record,
    read_index,
    read_property,
    unpack_record,
    write_recordio,
)
from golden import golden_dir


GOLDEN = golden_dir("insightface")
needs_golden = pytest.mark.skipif(GOLDEN is None, reason="golden insightface files not found: set LIT_TASKS_SHARED "
                                  "to the shared folder holding golden/insightface")
VALUES = json.loads((GOLDEN / "values.json").read_text()) if GOLDEN is not None else {}


def sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def golden_copy(tmp_path: Path, name: str) -> Path:
    """A writable copy of ``name``.rec/.idx in ``tmp_path`` (without the ``property`` file)."""
    for suffix in (".rec", ".idx"):
        shutil.copyfile(GOLDEN / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
        os.chmod(tmp_path / f"{name}{suffix}", 0o644)
    return tmp_path / f"{name}.rec"


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def jpeg(seed: int, size: int = 16) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --------------------------------------------------------------------------------------------- golden files


@needs_golden
def test_golden_train_every_record_matches_mxnet():
    train = VALUES["train"]
    ds = RecordIODataset(GOLDEN / "train.rec", decode=decode_image)
    assert ds.header0 == (train["header0"]["label"][0], train["header0"]["label"][1]) == (25, 31)
    assert len(ds) == train["num_images"] == 24
    assert ds.image_keys.tolist() == train["image_keys"]
    assert ds.num_identities == train["num_classes"] == 6
    for i, key in enumerate(ds.image_keys.tolist()):
        expected = train["records"][str(key)]
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (112, 112, 3), key
        assert label == expected["label"], key
        assert sha(image) == expected["rgb_sha256"], key
        assert image[0, 0].tolist() == expected["rgb_pixel_0_0"] and image[56, 56].tolist() == expected["rgb_pixel_56_56"]
        assert ds.label(i) == expected["label"]
    assert ds.labels().tolist() == [train["records"][str(k)]["label"] for k in train["image_keys"]]
    ranges = ds.identity_ranges()
    assert ranges.tolist() == [train["identity_ranges"][str(n)] for n in range(6)]


@needs_golden
def test_golden_train_raw_records_headers_and_index():
    train = VALUES["train"]
    rec = IndexedRecordIO(GOLDEN / "train.rec", GOLDEN / "train.idx")
    assert [[int(k), int(o)] for k, o in zip(rec.keys, rec.offsets)] == train["idx_file_order"]
    assert rec.size == train["rec_size"]
    for key, expected in train["records"].items():
        payload = rec.read(int(key))
        header, data = unpack_record(payload)
        want = expected["header"]
        assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"]), key
        assert np.array_equal(np.atleast_1d(header.label), np.atleast_1d(np.float32(want["label"]))), key
        assert len(payload) == 24 + 4 * header.flag + len(data)
        if expected["kind"] == "image":
            assert len(data) == expected["jpeg_len"]
            assert hashlib.sha256(bytes(data)).hexdigest() == expected["jpeg_sha256"], key
    # Key 9 stores its label as the array [2, 0]: the class is its first value.
    assert class_of(rec.read_header(9).label) == 2 and rec.read_header(9).flag == 2


@needs_golden
def test_golden_multi_part_record_joins_chunks_with_magic():
    """Key 14's JPEG holds the magic word at payload offsets 48 and 56, so MXNet stored it as chunks c1:48 + c2:4 + c3:7197."""
    rec = IndexedRecordIO(GOLDEN / "train.rec")
    payload = bytes(rec.read(14))
    offsets = VALUES["train"]["magic_escape"]["magic_payload_offsets"]
    assert [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == MAGIC_BYTES] == offsets == [48, 56]
    raw = (GOLDEN / "train.rec").read_bytes()
    start = VALUES["train"]["records"]["14"]["offset"]
    framed = frame_record(payload)
    assert raw[start : start + len(framed)] == framed
    chunks, pos = [], 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        chunks.append([lrec >> 29, lrec & (2**29 - 1)])
        pos += 8 + (lrec & (2**29 - 1)) + (-(lrec & (2**29 - 1)) % 4)
    assert chunks == VALUES["train"]["records"]["14"]["parts"]


@needs_golden
def test_golden_plain_layout_every_key_is_an_image():
    plain = VALUES["plain"]
    ds = RecordIODataset(GOLDEN / "plain.rec", decode=decode_image)
    assert ds.header0 is None
    assert ds.image_keys.tolist() == plain["image_keys"] == list(range(24))
    assert [ds.label(i) for i in range(len(ds))] == plain["labels_in_key_order"]
    for i in range(len(ds)):
        image, label = ds[i]
        expected = plain["records"][str(i)]
        assert label == expected["label"] and sha(image) == expected["rgb_sha256"], i
    with pytest.raises(ValueError, match="no header record"):
        ds.identity_ranges()


@needs_golden
def test_writer_reproduces_mxnet_bytes(tmp_path):
    """Re-packing the golden records gives MXNet's .rec and .idx byte for byte (framing, chunking, padding, index)."""
    for name in ("train", "plain"):
        rec = IndexedRecordIO(GOLDEN / f"{name}.rec")
        records = []
        for key in rec.keys.tolist():
            header, data = unpack_record(rec.read(key))
            records.append((key, pack_record(header, bytes(data))))
        write_recordio(tmp_path / f"{name}.rec", records)
        assert (tmp_path / f"{name}.rec").read_bytes() == (GOLDEN / f"{name}.rec").read_bytes()
        assert (tmp_path / f"{name}.idx").read_bytes() == (GOLDEN / f"{name}.idx").read_bytes()
        with pytest.raises(FileExistsError):
            write_recordio(tmp_path / f"{name}.rec", records)
    assert read_property(GOLDEN / "property") == (6, 112, 112)


@needs_golden
def test_decoder_matches_pillow_reference_on_golden_bytes():
    rec = IndexedRecordIO(GOLDEN / "plain.rec")
    _, data = unpack_record(rec.read(3))
    import io

    decoded = decode_image(data)
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB")))
    assert decoded.flags.writeable and decoded.flags.owndata  # in-place augmentations and torch.from_numpy need it
    with pytest.raises(OSError, match="cannot read image some record: "):
        decode_image(bytes(data)[:200], "some record")


# ------------------------------------------------------------------------------------------------ corruptions


@needs_golden
def test_flipped_magic_is_named(tmp_path):
    rec = golden_copy(tmp_path, "train")
    offset = VALUES["train"]["records"]["5"]["offset"]
    patch(rec, offset, struct.pack("<I", MAGIC ^ 0x1))
    ds = RecordIODataset(rec, decode=decode_image)
    assert ds[3][1] == 0  # the record before it still reads
    with pytest.raises(RecordIOError, match=rf"train.rec: key 5 at byte offset {offset}: bad magic") as info:
        ds[4]
    assert (info.value.key, info.value.offset) == (5, offset) and info.value.path == str(rec)


@needs_golden
def test_truncated_tail_is_named(tmp_path):
    # train.rec ends with the header record 0: construction itself must fail, naming key 0.
    rec = golden_copy(tmp_path, "train")
    size = VALUES["train"]["rec_size"]
    os.truncate(rec, size - 10)
    with pytest.raises(RecordIOError, match=rf"key 0 at byte offset {size - 40}: truncated"):
        RecordIODataset(rec)
    # plain.rec ends with an image: the dataset opens, the last image is refused, the others read.
    rec = golden_copy(tmp_path, "plain")
    last = VALUES["plain"]["records"]["23"]["offset"]
    os.truncate(rec, VALUES["plain"]["rec_size"] - 100)
    ds = RecordIODataset(rec, decode=decode_image)
    assert ds[22][1] == 2
    with pytest.raises(RecordIOError, match=rf"key 23 at byte offset {last}: truncated.*past the end of the file"):
        ds[23]
    # Cut inside a chunk header: refused by the index check when opened, and by the read if cut after opening.
    os.truncate(rec, last + 4)
    with pytest.raises(RecordIOError, match=rf"plain.idx: key 23 at byte offset {last}: line 24: offset lies past the end"):
        RecordIODataset(rec)
    with pytest.raises(RecordIOError, match=rf"key 23 at byte offset {last}: truncated: the file ends at byte {last + 4}"):
        ds[23]


@needs_golden
def test_index_offset_past_end_is_named(tmp_path):
    rec = golden_copy(tmp_path, "plain")
    idx = tmp_path / "plain.idx"
    lines = idx.read_text().splitlines()
    lines[5] = "5\t999996"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"plain.idx: key 5 at byte offset 999996: line 6: offset lies past the end"):
        RecordIODataset(rec)


@needs_golden
def test_index_offset_into_a_record_is_named(tmp_path):
    rec = golden_copy(tmp_path, "plain")
    idx = tmp_path / "plain.idx"
    original = idx.read_text()
    # An aligned offset inside key 5's JPEG: no magic there (the writer escapes aligned magic words).
    inside = VALUES["plain"]["records"]["5"]["offset"] + 1000
    idx.write_text(original.replace(f"5\t{VALUES['plain']['records']['5']['offset']}\n", f"5\t{inside}\n"))
    ds = RecordIODataset(rec, decode=decode_image)
    with pytest.raises(RecordIOError, match=rf"key 5 at byte offset {inside}: bad magic .* not the start of a record"):
        ds[5]
    # The second chunk of the multi-part key 14: a real chunk header, but not a record start.
    start = VALUES["plain"]["records"]["14"]["offset"]
    idx.write_text(original.replace(f"14\t{start}\n", f"14\t{start + 8 + 48}\n"))
    with pytest.raises(RecordIOError, match=r"key 14 .* points into the middle of a multi-part record"):
        RecordIODataset(rec, decode=decode_image)[14]
    # An offset that is not 4-byte aligned can never be a record start.
    idx.write_text(original.replace(f"14\t{start}\n", f"14\t{start + 2}\n"))
    with pytest.raises(RecordIOError, match=rf"plain.idx: key 14 at byte offset {start + 2}: line 15: offset is not a multiple of 4"):
        RecordIODataset(rec)


@needs_golden
def test_length_past_end_and_into_next_record_are_named(tmp_path):
    rec = golden_copy(tmp_path, "plain")
    offset = VALUES["plain"]["records"]["7"]["offset"]
    patch(rec, offset + 4, struct.pack("<I", 2**29 - 1))  # cflag 0, the largest length
    ds = RecordIODataset(rec, decode=decode_image)
    with pytest.raises(RecordIOError, match=rf"key 7 at byte offset {offset}: truncated.*past the end of the file"):
        ds[7]
    length = VALUES["plain"]["records"]["7"]["parts"][0][1]
    patch(rec, offset + 4, struct.pack("<I", length + 400))  # into key 8
    with pytest.raises(RecordIOError, match=r"key 7 .* past the start of the next indexed record at byte "
                       + str(VALUES["plain"]["records"]["8"]["offset"])):
        ds[7]
    patch(rec, offset + 4, struct.pack("<I", (5 << 29) | length))  # chunk flag 5 does not exist
    with pytest.raises(RecordIOError, match=r"key 7 .* invalid chunk flag 5"):
        ds[7]


@needs_golden
def test_errors_cross_worker_boundaries_with_their_fields(tmp_path):
    rec = golden_copy(tmp_path, "plain")
    patch(rec, VALUES["plain"]["records"]["2"]["offset"], b"\0\0\0\0")
    loader = torch.utils.data.DataLoader(RecordIODataset(rec, decode=decode_image), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", sampler=[2])
    with pytest.raises(RecordIOError, match=r"(?s)Caught RecordIOError in DataLoader worker.*plain.rec: key 2 at byte offset "
                       + str(VALUES["plain"]["records"]["2"]["offset"]) + ": bad magic"):
        next(iter(loader))


def test_bad_index_lines_are_named(tmp_path):
    write_recordio(tmp_path / "a.rec", [(k, pack_record(IRHeader(0, float(k), k, 0), jpeg(k))) for k in range(3)])
    idx = tmp_path / "a.idx"
    good = idx.read_text()
    idx.write_text(good + "7\tx12\n")
    with pytest.raises(RecordIOError, match=r"a.idx: line 4: expected 'key<TAB>offset'"):
        read_index(idx)
    lines = good.splitlines()
    idx.write_text("\n".join(lines + [lines[1].replace("1\t", "0\t")]) + "\n")
    with pytest.raises(RecordIOError, match=r"a.idx: key 0: listed twice, on lines 1 and 4"):
        IndexedRecordIO(tmp_path / "a.rec")
    idx.write_text(good)
    with pytest.raises(KeyError, match="no record with key 9"):
        IndexedRecordIO(tmp_path / "a.rec").read(9)
    with pytest.raises(FileNotFoundError, match="b.rec does not exist"):
        IndexedRecordIO(tmp_path / "b.rec")


def test_without_a_decoder_the_format_gives_the_encoded_bytes(tmp_path):
    """The format decodes nothing itself (the face family passes the decoder): no decoder, the stored image bytes."""
    images = [jpeg(k) for k in range(3)]
    write_recordio(tmp_path / "raw.rec", [(k, pack_record(IRHeader(0, float(k), k, 0), images[k])) for k in range(3)])
    ds = RecordIODataset(tmp_path / "raw.rec")
    assert [ds[k] for k in range(3)] == [(images[k], k) for k in range(3)]
    assert RecordIODataset(tmp_path / "raw.rec", transform=len)[2] == (len(images[2]), 2)


def test_bad_payloads_and_labels_are_named(tmp_path):
    good = jpeg(1)
    records = [
        (0, pack_record(IRHeader(0, 1.0, 0, 0), good)),
        (1, b"short"),  # shorter than an IRHeader
        (2, struct.pack("<IfQQ", 5, 0.0, 2, 0) + b"\0" * 8),  # announces 5 labels, holds 2
        (3, pack_record(IRHeader(0, 2.5, 3, 0), good)),  # not an integer class
        (4, pack_record(IRHeader(0, 1.0, 4, 0), good[: len(good) // 2])),  # truncated JPEG
        (5, pack_record(IRHeader(0, [3.0, 1.0], 5, 0), good)),  # array label: first value
        (6, pack_record(IRHeader(0, -1.0, 6, 0), good)),
    ]
    write_recordio(tmp_path / "b.rec", records)
    ds = RecordIODataset(tmp_path / "b.rec", decode=decode_image)  # record 0 has flag 0: every key is an image
    assert ds.header0 is None and len(ds) == 7 and ds.num_identities is None
    assert ds[0][1] == 1 and ds[5][1] == 3
    assert np.array_equal(ds[5][0], decode_image(good))
    with pytest.raises(RecordIOError, match=r"b.rec: key 1 at byte offset \d+: payload of 5 bytes is shorter than"):
        ds[1]
    with pytest.raises(RecordIOError, match=r"key 2 .* flag 5 announces 5 float32 labels"):
        ds[2]
    with pytest.raises(ValueError, match=r"key 3 .* label 2.5 is not a non-negative integer"):
        ds[3]
    with pytest.raises(OSError, match=r"cannot read image .*b.rec: key 4 at byte offset \d+: "):
        ds[4]
    with pytest.raises(ValueError, match=r"key 6 .* label -1.0"):
        ds[6]
    with pytest.raises(IndexError):
        ds[7]


def test_header_layout_refuses_missing_keys(tmp_path):
    image = jpeg(2)
    records = [(1, pack_record(IRHeader(0, 0.0, 1, 0), image)), (2, pack_record(IRHeader(0, 0.0, 2, 0), image)),
               (3, pack_record(IRHeader(0, [1.0, 3.0], 3, 0))), (0, pack_record(IRHeader(0, [3.0, 5.0], 0, 1)))]
    write_recordio(tmp_path / "c.rec", records)  # identity key 4 is missing
    with pytest.raises(RecordIOError, match=r"c.idx: key 4: listed by the header record .* not in the index"):
        RecordIODataset(tmp_path / "c.rec")


def test_without_key_zero_every_key_is_an_image_in_index_order(tmp_path):
    keys = [7, 3, 11]
    write_recordio(tmp_path / "d.rec", [(k, pack_record(IRHeader(0, float(k), k, 0), jpeg(k))) for k in keys])
    ds = RecordIODataset(tmp_path / "d.rec", decode=decode_image)
    assert ds.image_keys.tolist() == keys and [ds[i][1] for i in range(3)] == keys
    assert np.array_equal(ds[1][0], decode_image(jpeg(3)))
    assert 3 in ds.records and 4 not in ds.records


def im2rec_array_label_pack(path: Path, classes: list[int], aligned: float = 1.0) -> list[bytes]:
    """An ``im2rec``-style pack (keys 0, 1, ... every one an image, no header record) whose labels are arrays: every
    record has ``flag 2`` and the label ``[class, aligned]`` (face2rec2's ``--pack-label`` layout), key 0 included.
    Returns the JPEGs in key order."""
    images = [jpeg(20 + k) for k in range(len(classes))]
    write_recordio(path, [(k, pack_record(IRHeader(2, [float(c), aligned], k, 0), images[k]))
                          for k, c in enumerate(classes)])
    return images


@pytest.mark.parametrize("first_class", [0, 1, 4])
def test_key_zero_with_array_label_and_an_image_is_an_image_not_the_header(tmp_path, first_class):
    """A header record carries no image; key 0 here is a JPEG with an array label (``flag > 0``), so the pack has no
    header and every key is an image. Taken as the header (insightface's ``MXFaceDataset`` does), its label
    ``[class, 1.0]`` made the pack fail to open (class 0 or 4: not ``[first identity key, end]``) or open empty
    (class 1: images ``1..0``)."""
    classes = [first_class, 1, 0, 2, 1]
    images = im2rec_array_label_pack(tmp_path / "im2rec.rec", classes)
    ds = RecordIODataset(tmp_path / "im2rec.rec", decode=decode_image)
    assert ds.header0 is None and ds.num_identities is None
    assert ds.image_keys.tolist() == [0, 1, 2, 3, 4] and len(ds) == 5
    assert ds.labels().tolist() == classes
    for k, expected in enumerate(images):
        image, label = ds[k]
        assert label == classes[k] and np.array_equal(image, decode_image(expected)), k
    with pytest.raises(ValueError, match="no header record"):
        ds.identity_ranges()


def test_a_header_record_is_still_recognised_by_its_empty_payload(tmp_path):
    """insightface's header record (key 0, ``flag 2``, label ``[first identity key, end]``, no image), written first
    or last, beside images whose labels are arrays too."""
    images = [jpeg(30 + k) for k in range(3)]
    records = [(k + 1, pack_record(IRHeader(2, [float(c), 1.0], k + 1, 0), images[k])) for k, c in enumerate([0, 0, 1])]
    records += [(4, pack_record(IRHeader(2, [1.0, 3.0], 4, 0))), (5, pack_record(IRHeader(2, [3.0, 4.0], 5, 0)))]
    header = (0, pack_record(IRHeader(2, [4.0, 6.0], 0, 1)))
    for name, ordered in (("last", records + [header]), ("first", [header] + records)):
        write_recordio(tmp_path / f"{name}.rec", ordered)
        ds = RecordIODataset(tmp_path / f"{name}.rec", decode=decode_image)
        assert ds.header0 == (4, 6) and ds.num_identities == 2 and ds.image_keys.tolist() == [1, 2, 3]
        assert [ds[i][1] for i in range(3)] == [0, 0, 1] and np.array_equal(ds[2][0], decode_image(images[2]))
        assert ds.identity_ranges().tolist() == [[1, 3], [3, 4]]


def test_chunking_round_trip_with_magic_at_every_position(tmp_path):
    """Payloads with the magic word at aligned (escaped) and unaligned (kept) offsets, at the start and the end."""
    rng = np.random.default_rng(3)
    payloads = []
    for n in range(12):
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            at = int(rng.integers(0, len(body) + 1))
            body[at:at] = MAGIC_BYTES
        payloads.append(bytes(body))
    payloads += [MAGIC_BYTES, MAGIC_BYTES * 3, b"", b"x" + MAGIC_BYTES, MAGIC_BYTES + b"abc"]
    write_recordio(tmp_path / "e.rec", list(enumerate(payloads)))
    rec = IndexedRecordIO(tmp_path / "e.rec")
    raw = (tmp_path / "e.rec").read_bytes()
    for key, payload in enumerate(payloads):
        assert bytes(rec.read(key)) == payload, key
    # Every aligned magic word in the file is a chunk start: the payloads' own aligned ones were escaped.
    for pos in range(0, len(raw), 4):
        if raw[pos : pos + 4] == MAGIC_BYTES:
            assert (struct.unpack_from("<I", raw, pos + 4)[0] >> 29) <= 3


@needs_golden
def test_reads_only_the_record_not_the_file(tmp_path, monkeypatch):
    sizes = []
    real = os.pread

    def spy(fd, n, offset):
        sizes.append(n)
        return real(fd, n, offset)

    ds = RecordIODataset(GOLDEN / "train.rec", decode=decode_image)
    monkeypatch.setattr(os, "pread", spy)
    for i in range(len(ds)):
        ds[i]
    largest = max(r["parts"][0][1] + 8 for r in VALUES["train"]["records"].values() if len(r["parts"]) == 1)
    assert len(sizes) == len(ds)  # one read per record
    assert max(sizes) <= largest + 16  # its own bytes (+ up to 3 of padding), never the file
    sizes.clear()
    assert ds.labels().tolist() == [VALUES["train"]["records"][str(k)]["label"] for k in range(1, 25)]
    # Labels read 64 bytes per record; only the multi-part key 14 is read whole (its first chunk is 48 bytes).
    assert len(sizes) == 25 and sorted(sizes)[:-1] == [64] * 24 and sorted(sizes)[-1] > 7000


@needs_golden
def test_index_fast_and_careful_parsers_agree(tmp_path):
    keys, offsets = read_index(GOLDEN / "train.idx")  # well formed: the vectorised path
    assert [[int(k), int(o)] for k, o in zip(keys, offsets)] == VALUES["train"]["idx_file_order"]
    (tmp_path / "crlf.idx").write_bytes((GOLDEN / "train.idx").read_bytes().replace(b"\n", b"\r\n") + b"\n\n")
    again = read_index(tmp_path / "crlf.idx")  # CRLF and trailing blank lines: line by line
    assert np.array_equal(again[0], keys) and np.array_equal(again[1], offsets)
    (tmp_path / "shifted.idx").write_bytes(b"1\t0\t8\n2\n")  # token count right, lines wrong
    with pytest.raises(RecordIOError, match=r"shifted.idx: line 1: expected 'key<TAB>offset'"):
        read_index(tmp_path / "shifted.idx")
    (tmp_path / "huge.idx").write_bytes(b"1\t99999999999999999999999\n")
    with pytest.raises(RecordIOError, match=r"huge.idx: line 1"):
        read_index(tmp_path / "huge.idx")
    rec = IndexedRecordIO(GOLDEN / "train.rec")  # keys not sorted in the file (0 last): lookups through a sort
    assert rec.positions(np.array([0, 30, 1, 31, 99])).tolist() == [30, 29, 0, -1, -1]


# --------------------------------------------------------------------------------------------- processes


def _read_in_child(ds: RecordIODataset, queue) -> None:
    image, label = ds[5]
    queue.put((ds.records._pid == os.getpid(), ds.records._fd, sha(image), label))


@needs_golden
def test_forked_process_opens_its_own_descriptor():
    ds = RecordIODataset(GOLDEN / "train.rec", decode=decode_image)
    image, label = ds[5]
    parent_fd = ds.records._fd
    assert ds.records._pid == os.getpid() and parent_fd >= 0
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(ds, queue))
    child.start()
    own, fd, digest, child_label = queue.get(timeout=60)
    child.join(timeout=60)
    assert own and fd >= 0 and (digest, child_label) == (sha(image), label)
    state = ds.__dict__["records"].__getstate__()
    assert state["_fd"] == -1 and state["_pid"] == -1  # a pickled (spawned) copy opens its own too


@needs_golden
@pytest.mark.parametrize("name", ["train", "plain"])
def test_two_fork_workers_give_the_same_samples_as_none(name):
    ds = RecordIODataset(GOLDEN / f"{name}.rec", decode=decode_image)

    def batches(workers: int) -> list:
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers, shuffle=False,
                                             multiprocessing_context="fork" if workers else None)
        return [(images.clone(), labels.clone()) for images, labels in loader]

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 5
    for (a, la), (b, lb) in zip(single, multi):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert [sha(im.numpy()) for batch, _ in single for im in batch] == [
        VALUES[name]["records"][str(k)]["rgb_sha256"] for k in ds.image_keys.tolist()
    ]
