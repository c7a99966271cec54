"""Framing, writer, compression, corruption handling and the index CLI of datamodules.tfrecord."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.tfrecord import (
    CorruptRecordError,
    CorruptRecordWarning,
    RecordReader,
    StaleIndexError,
    TFRecordDataset,
    TFRecordWriter,
    build_example,
    bytes_feature,
    float_feature,
    index_path,
    int64_feature,
    masked_crc32c,
    read_examples,
    read_index,
    read_records,
    scan_shard,
)
from datamodules.tfrecord.framing import encode_header
from datamodules.tfrecord.index import main as index_main

DATA = Path(__file__).parent / "data" / "tfrecord"
REPO = Path(__file__).resolve().parents[1]
VALUES = json.loads((DATA / "values.json").read_text())


def test_masked_crc_matches_tensorflow_reference_values() -> None:
    # Values from TensorFlow's crc32c_test.cc / LevelDB: CRC-32C of 32 zero bytes is 0x8a9136aa, and the
    # mask is rotate-right-15 plus 0xa282ead8.
    crc = 0x8A9136AA
    assert masked_crc32c(bytes(32)) == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == (((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_shard(path: Path, n: int = 5, compression: str | None = "auto") -> list[bytes]:
    """A shard of ``n`` tf.Examples with ids 0..n-1 and blobs of different sizes; returns the payloads."""
    payloads = []
    with TFRecordWriter(path, compression=compression) as writer:
        for k in range(n):
            payload = build_example({"id": [k], "blob": bytes([k]) * (100 + 37 * k)}).SerializeToString(deterministic=True)
            writer.write(payload)
            payloads.append(payload)
    return payloads


def ids(examples) -> list[int]:
    return [int(example["id"][0]) for example in examples]


# -- writer and reader -------------------------------------------------------------------------------


def test_writer_accepts_messages_and_writes_an_index(tmp_path: Path) -> None:
    path = tmp_path / "a.tfrecord"
    example = build_example({"x": [1.5], "y": b"z"})
    with TFRecordWriter(path) as writer:
        writer.write(example)
        writer.write(example.SerializeToString(deterministic=True))
        assert writer.num_records == 2
        with pytest.raises(TypeError, match="records are bytes or protobuf messages"):
            writer.write("text")  # type: ignore[arg-type]
    payloads = [bytes(p) for p in read_records(path)]
    assert payloads[0] == payloads[1] == example.SerializeToString(deterministic=True)
    size = len(payloads[0]) + 16
    assert read_index(index_path(path)).tolist() == [[0, size], [size, size]]
    assert path.stat().st_size == 2 * size


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.dictionaries(
        st.text(min_size=1, max_size=6),
        st.one_of(
            st.lists(st.binary(max_size=300), max_size=3).map(bytes_feature),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5).map(int64_feature),
            st.lists(st.floats(width=32), max_size=5).map(float_feature),
        ),
        max_size=4,
    ), max_size=6),
    st.sampled_from([None, "gzip", "zlib"]),
)
def test_round_trip_random_examples(records: list[dict], compression: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tfrecord"
        examples = [build_example(features) for features in records]
        with TFRecordWriter(path, compression=compression) as writer:
            for example in examples:
                writer.write(example)
        parsed = list(read_examples(path, compression=compression))
        assert len(parsed) == len(examples)
        for ours, example in zip(parsed, examples):
            for key, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = getattr(feature, kind).value
                if kind == "bytes_list":
                    assert ours[key] == list(values)
                else:
                    expected = np.array(values, dtype=np.float32 if kind == "float_list" else np.int64)
                    assert ours[key].dtype == expected.dtype
                    assert ours[key].tobytes() == expected.tobytes()  # bit-exact, NaN included
        assert scan_shard(path, compression).tolist() == read_index(index_path(path)).tolist()


def test_stale_views_fail_loudly_and_kept_arrays_stay_valid(tmp_path: Path) -> None:
    path = tmp_path / "a.tfrecord"
    payloads = write_shard(path, 4)
    views = list(read_records(path))  # keeping views past the next record is a bug...
    with pytest.raises(ValueError, match="released"):
        bytes(views[0])  # ...that fails loudly instead of showing another record's bytes
    # Arrays made from the views keep their own record's bytes: the reader moves on to a fresh buffer.
    arrays = [np.frombuffer(view, dtype=np.uint8) for view in read_records(path)]
    assert [a.tobytes() for a in arrays] == payloads
    arrays = [np.frombuffer(view, dtype=np.uint8) for view in read_records(path, use_mmap=False)]
    assert [a.tobytes() for a in arrays] == payloads  # the same when reading into the reused buffer
    # A plain loop (whose variable still names the last view while the next is read) reuses one buffer.
    reader = RecordReader(path, use_mmap=False)
    buffers = {id(reader._buffer) for _ in reader}
    assert len(buffers) == 1


def test_large_records_grow_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "big.tfrecord.gz"
    blobs = [os.urandom(n) for n in (10, 300_000, 50, 2_000_000)]
    with TFRecordWriter(path) as writer:
        for blob in blobs:
            writer.write(blob)
    assert [bytes(p) for p in read_records(path)] == blobs
    assert [bytes(p) for p in read_records(path, compression="gzip")] == blobs


def test_compression_argument_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "a.tfrecord"
    write_shard(path, 1)
    with pytest.raises(ValueError, match="compression must be"):
        list(read_records(path, compression="lz4"))


# -- corruption ------------------------------------------------------------------------------------


def _flip(data: bytearray, position: int) -> None:
    data[position] ^= 0x40


def _make_undecodable(data: bytearray, offset: int, framed: int) -> None:
    """Replace a payload with bytes that are not protobuf, with valid CRCs (so only parsing can tell)."""
    length = framed - 16
    garbage = b"\xff" * length
    data[offset + 12 : offset + 12 + length] = garbage
    data[offset + 12 + length : offset + framed] = masked_crc32c(garbage).to_bytes(4, "little")


# kind -> (damaged record, reason pattern, ids read with index when skipping, ids read without index)
CORRUPTIONS = {
    "length_field": (2, r"length CRC mismatch", [0, 1, 3, 4], [0, 1]),
    "length_crc": (2, r"length CRC mismatch", [0, 1, 3, 4], [0, 1]),
    "payload": (3, r"payload CRC mismatch", [0, 1, 2, 4], [0, 1, 2, 4]),
    "payload_crc": (3, r"payload CRC mismatch", [0, 1, 2, 4], [0, 1, 2, 4]),
    "truncated_payload": (4, r"truncated record: the header announces a \d+-byte payload but the shard ends 10 bytes",
                          [0, 1, 2, 3], [0, 1, 2, 3]),
    "truncated_header": (4, r"truncated record header: the shard ends 5 bytes into the 12-byte header",
                         [0, 1, 2, 3], [0, 1, 2, 3]),
    "undecodable": (2, r"undecodable payload: not a valid tf.Example", [0, 1, 3, 4], [0, 1, 3, 4]),
}


def damage(path: Path, kind: str) -> tuple[int, int]:
    """Damage the shard in place; returns the damaged record's number and byte offset."""
    index = read_index(index_path(path))
    record = CORRUPTIONS[kind][0]
    offset, framed = (int(v) for v in index[record])
    data = bytearray(path.read_bytes())
    if kind == "length_field":
        _flip(data, offset + 1)
    elif kind == "length_crc":
        _flip(data, offset + 9)
    elif kind == "payload":
        _flip(data, offset + 12 + 5)
    elif kind == "payload_crc":
        _flip(data, offset + framed - 2)
    elif kind == "truncated_payload":
        del data[offset + 12 + 10 :]
    elif kind == "truncated_header":
        del data[offset + 5 :]
    elif kind == "undecodable":
        _make_undecodable(data, offset, framed)
    path.write_bytes(bytes(data))
    return record, offset


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_raises_naming_shard_record_and_offset(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "shard.tfrecord"
    write_shard(path)
    record, offset = damage(path, kind)
    reason = CORRUPTIONS[kind][1]
    expected = re.escape(f"{path}: record {record} at byte offset {offset}: ") + reason
    with pytest.raises(CorruptRecordError, match=expected) as info:
        list(read_examples(path))
    assert (info.value.shard, info.value.record, info.value.offset) == (str(path), record, offset)
    with pytest.raises(CorruptRecordError, match=expected):  # the dataset, reading through the index
        list(TFRecordDataset(path, uneven="none"))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_skipped_with_a_warning(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "shard.tfrecord"
    write_shard(path)
    record, offset = damage(path, kind)
    _, reason, with_index, without_index = CORRUPTIONS[kind]
    expected = re.escape(f"{path}: record {record} at byte offset {offset}: ") + reason
    with pytest.warns(CorruptRecordWarning, match=expected):
        assert ids(read_examples(path, on_corrupt="skip")) == without_index
    with pytest.warns(CorruptRecordWarning, match=expected):
        assert ids(TFRecordDataset(path, on_corrupt="skip", uneven="none")) == with_index
    reader = RecordReader(path, on_corrupt="skip", index=read_index(index_path(path)), warn=False)
    survivors = len(list(reader))
    assert survivors + reader.skipped == 5 or kind == "undecodable"  # undecodable is caught by the parser


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_mapped_and_buffered_reading_agree_on_damage(kind: str, tmp_path: Path) -> None:
    """Plain shards are memory-mapped by default; the buffered path must report and skip exactly alike."""
    path = tmp_path / "shard.tfrecord"
    write_shard(path)
    damage(path, kind)
    if kind != "undecodable":  # its framing is intact: only the parser sees the damage
        messages = []
        for use_mmap in (True, False):
            with pytest.raises(CorruptRecordError) as info:
                list(RecordReader(path, use_mmap=use_mmap))
            messages.append(str(info.value))
        assert messages[0] == messages[1]
    outcomes = []
    for use_mmap in (True, False):
        reader = RecordReader(path, on_corrupt="skip", index=read_index(index_path(path)), warn=False,
                              use_mmap=use_mmap)
        outcomes.append(([bytes(p) for _, _, p in reader], reader.skipped))
    assert outcomes[0] == outcomes[1]


def test_corrupt_huge_length_never_allocates(tmp_path: Path) -> None:
    # A header with a valid CRC announcing 2**62 bytes: plain shards compare it with the file size,
    # compressed ones only grow the buffer as decompressed bytes arrive.
    header = encode_header(2**62)
    plain = tmp_path / "huge.tfrecord"
    plain.write_bytes(header + b"\0" * 1000)
    squeezed = tmp_path / "huge.tfrecord.gz"
    squeezed.write_bytes(gzip.compress(header + b"\0" * 3_000_000))
    for path in (plain, squeezed):
        tracemalloc.start()
        with pytest.raises(CorruptRecordError, match=r"record 0 at byte offset 0: truncated record: the header "
                                                     r"announces a 4611686018427387904-byte payload"):
            list(read_records(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 2**20, f"{path.name}: peak {peak} bytes"


def test_compressed_stream_damage(tmp_path: Path) -> None:
    path = tmp_path / "shard.tfrecord.gz"
    write_shard(path, 40)
    data = path.read_bytes()
    cut = tmp_path / "cut.tfrecord.gz"
    cut.write_bytes(data[: len(data) // 2])
    pattern = r"cut\.tfrecord\.gz: record (\d+) at byte offset (\d+): (compressed stream is damaged: .*truncated|truncated record)"
    with pytest.raises(CorruptRecordError, match=pattern) as info:
        list(read_records(cut))
    good = info.value.record
    assert good > 0 and info.value.offset == int(read_index(index_path(path))[good, 0])
    with pytest.warns(CorruptRecordWarning, match=pattern):
        assert ids(read_examples(cut, on_corrupt="skip")) == list(range(good))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flip.tfrecord.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CorruptRecordError, match=r"flip\.tfrecord\.gz: record \d+ at byte offset \d+: "
                                                 r"(compressed stream is damaged|payload CRC|length CRC|truncated)"):
        list(read_records(bad))


def test_stale_indexes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "shard.tfrecord"
    write_shard(path, 3)
    with TFRecordWriter(tmp_path / "extra.tfrecord") as extra:
        extra.write(b"one more")
    with open(path, "ab") as f:
        f.write((tmp_path / "extra.tfrecord").read_bytes())  # appended after the index was written
    with pytest.raises(StaleIndexError, match="rebuild it"):
        TFRecordDataset(path)
    squeezed = tmp_path / "shard.tfrecord.gz"
    write_shard(squeezed, 3)
    index = index_path(squeezed)
    kept = Path(index).read_text()
    write_shard(squeezed, 4)
    Path(index).write_text(kept)  # index of the 3-record version beside a 4-record shard
    with pytest.raises(StaleIndexError, match="more data after record 2"):
        list(TFRecordDataset(squeezed))
    Path(index).write_text("0 100\n500 100\n")
    with pytest.raises(ValueError, match=r"line 2: record 1 at offset 500 .* does not follow the previous record"):
        TFRecordDataset(squeezed)
    Path(index).write_text("0 100 7\n")
    with pytest.raises(ValueError, match=r"line 1: expected 'offset length', got '0 100 7'"):
        TFRecordDataset(squeezed)


# -- index CLI ------------------------------------------------------------------------------------------


def test_index_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = ["examples.tfrecord", "examples.tfrecord.gz", "object_detection.tfrecord"]
    for name in names:
        shutil.copy(DATA / name, tmp_path / name)
    shards = [str(tmp_path / n) for n in names]
    assert index_main(shards) == 0
    golden = {name: VALUES[name.replace(".gz", "")]["index"] for name in names}
    for name in names:
        assert read_index(index_path(tmp_path / name)).tolist() == golden[name]
    Path(index_path(shards[0])).write_text("0 16\n")
    assert index_main(shards[:1]) == 0 and "exists, kept" in capsys.readouterr().out
    assert index_main(["--force", "--verify", shards[0]]) == 0
    assert read_index(index_path(shards[0])).tolist() == golden[names[0]]
    damaged = tmp_path / "bad.tfrecord"
    write_shard(damaged)
    os.remove(index_path(damaged))
    record, offset = damage_payload_and_rebuild_offset(damaged)
    assert index_main(["--verify", str(damaged)]) == 1
    assert f"record {record} at byte offset {offset}: payload CRC mismatch" in capsys.readouterr().err
    assert not os.path.exists(index_path(damaged))


def damage_payload_and_rebuild_offset(path: Path) -> tuple[int, int]:
    entries = scan_shard(path)
    offset = int(entries[1, 0])
    data = bytearray(path.read_bytes())
    _flip(data, offset + 20)
    path.write_bytes(bytes(data))
    return 1, offset


def test_index_cli_as_module(tmp_path: Path) -> None:
    shutil.copy(DATA / "sequence_examples.tfrecord", tmp_path / "seq.tfrecord")
    result = subprocess.run(  # -W error: runpy's "found in sys.modules" RuntimeWarning would fail it
        [sys.executable, "-W", "error", "-m", "datamodules.tfrecord.index", str(tmp_path / "seq.tfrecord")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert "(3 records)" in result.stdout
    expected = VALUES["sequence_examples.tfrecord"]["index"]
    assert read_index(tmp_path / "seq.tfrecord.index").tolist() == expected
    # The format is the `tfrecord` package's: "offset length" per line.
    assert (tmp_path / "seq.tfrecord.index").read_text() == "".join(f"{o} {n}\n" for o, n in expected)
