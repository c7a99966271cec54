"""Interop with TensorFlow 2.21: shards it wrote (tests/data/tfrecord, see README.md there) read here exactly.

Floats are compared by float32 bit pattern (so -0.0, +-inf are checked exactly), bytes byte for byte,
int64 including both extremes; our writer must reproduce TensorFlow's file bytes from the same payloads.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.tfrecord import (
    FixedLen,
    TFRecordWriter,
    VarLen,
    index_path,
    parse_example,
    parse_sequence_example,
    read_index,
    read_records,
    scan_shard,
)

DATA = Path(__file__).parent / "data" / "tfrecord"
VALUES = json.loads((DATA / "values.json").read_text())
PLAIN = ["examples.tfrecord", "sequence_examples.tfrecord", "object_detection.tfrecord"]


def assert_feature_equal(value, expected: dict, where: str) -> None:
    """One parsed feature against the JSON description TensorFlow's side wrote."""
    kind = expected["kind"]
    if kind == "bytes_list":
        assert value == [base64.b64decode(v) for v in expected["value_b64"]], where
    elif kind == "int64_list":
        assert isinstance(value, np.ndarray) and value.dtype == np.int64, where
        assert value.tolist() == expected["value"], where
    elif kind == "float_list":
        assert isinstance(value, np.ndarray) and value.dtype == np.float32, where
        assert value.view(np.uint32).tolist() == expected["bits"], where
    else:  # pragma: no cover - the JSON only has these kinds
        raise AssertionError(kind)


@pytest.mark.parametrize("name", ["examples.tfrecord", "examples.tfrecord.gz", "examples.tfrecord.zlib"])
def test_examples_decode_to_golden_values(name: str) -> None:
    expected = VALUES["examples.tfrecord"]["records"]
    records = [parse_example(payload) for payload in read_records(DATA / name)]
    assert len(records) == len(expected) == 6
    for i, (record, reference) in enumerate(zip(records, expected)):
        assert set(record) == set(reference), f"record {i}"
        for key, value in record.items():
            assert_feature_equal(value, reference[key], f"{name} record {i} key {key}")
    # The special values the README promises are really in there (so the bit comparison covered them).
    bits = set(np.concatenate([r["floats"] for r in records]).view(np.uint32).tolist())
    assert {0x7F800000, 0xFF800000, 0x00000000, 0x80000000} <= bits  # +inf, -inf, +0.0, -0.0
    ints = np.concatenate([r["ints"] for r in records]).tolist()
    assert -(2**63) in ints and 2**63 - 1 in ints


def test_examples_with_a_spec_apply_defaults_and_shapes() -> None:
    spec = {
        "id": FixedLen((), "int64"),
        "name": FixedLen((), "bytes"),
        "optional": FixedLen((), "int64", default=-1),
        "floats": VarLen("float"),
        "empty_bytes": VarLen("bytes"),
    }
    records = [parse_example(p, spec) for p in read_records(DATA / "examples.tfrecord")]
    expected = VALUES["examples.tfrecord"]["records"]
    for i, (record, reference) in enumerate(zip(records, expected)):
        assert record["id"].shape == () and int(record["id"]) == i
        assert record["name"] == base64.b64decode(reference["name"]["value_b64"][0])
        assert record["name"].decode("utf-8") == f"record-{i}-ünïcødé"
        assert int(record["optional"]) == (42 if i % 2 == 0 else -1)  # only even records carry it
        assert record["floats"].view(np.uint32).tolist() == reference["floats"]["bits"]
        assert record["empty_bytes"] == []


@pytest.mark.parametrize("name", ["examples.tfrecord.gz", "examples.tfrecord.zlib"])
def test_compressed_shards_hold_the_same_payloads(name: str) -> None:
    plain = [bytes(p) for p in read_records(DATA / "examples.tfrecord")]
    assert [bytes(p) for p in read_records(DATA / name)] == plain
    # Explicit compression works as well as detection by suffix.
    explicit = "gzip" if name.endswith(".gz") else "zlib"
    assert [bytes(p) for p in read_records(DATA / name, compression=explicit)] == plain


def test_compression_detected_by_content_without_suffix(tmp_path: Path) -> None:
    for name in ("examples.tfrecord.gz", "examples.tfrecord.zlib"):
        unnamed = tmp_path / f"shard-{name.rsplit('.', 1)[1]}"  # TensorFlow users often drop suffixes
        unnamed.write_bytes((DATA / name).read_bytes())
        assert [bytes(p) for p in read_records(unnamed)] == [bytes(p) for p in read_records(DATA / "examples.tfrecord")]


def test_sequence_examples_decode_to_golden_values() -> None:
    expected = VALUES["sequence_examples.tfrecord"]["records"]
    parsed = [parse_sequence_example(p) for p in read_records(DATA / "sequence_examples.tfrecord")]
    assert len(parsed) == len(expected) == 3
    for i, ((context, lists), reference) in enumerate(zip(parsed, expected)):
        assert set(context) == set(reference["context"])
        for key, value in context.items():
            assert_feature_equal(value, reference["context"][key], f"record {i} context {key}")
        assert set(lists) == set(reference["feature_lists"])
        for key, steps in lists.items():
            assert len(steps) == len(reference["feature_lists"][key])
            for t, (step, ref) in enumerate(zip(steps, reference["feature_lists"][key])):
                assert_feature_equal(step, ref, f"record {i} list {key} step {t}")


def test_sequence_examples_with_a_spec_stack_steps() -> None:
    expected = VALUES["sequence_examples.tfrecord"]["records"]
    for payload, reference in zip(read_records(DATA / "sequence_examples.tfrecord"), expected):
        context, lists = parse_sequence_example(
            payload,
            context={"num_frames": FixedLen((), "int64"), "video_id": FixedLen((), "bytes")},
            sequence={"rgb": FixedLen((8,), "float"), "label": FixedLen((), "int64")},
        )
        frames = int(context["num_frames"])
        assert lists["rgb"].shape == (frames, 8) and lists["rgb"].dtype == np.float32
        assert lists["rgb"].view(np.uint32).tolist() == [step["bits"] for step in reference["feature_lists"]["rgb"]]
        assert lists["label"].tolist() == [step["value"][0] for step in reference["feature_lists"]["label"]]
        assert context["video_id"] == base64.b64decode(reference["context"]["video_id"]["value_b64"][0])


def test_object_detection_records_decode_to_golden_values() -> None:
    expected = VALUES["object_detection.tfrecord"]["records"]
    payloads = [bytes(p) for p in read_records(DATA / "object_detection.tfrecord")]
    assert len(payloads) == len(expected) == 4
    for i, (payload, reference) in enumerate(zip(payloads, expected)):
        record = parse_example(payload)
        assert set(record) == set(reference["features"])
        for key, value in record.items():
            assert_feature_equal(value, reference["features"][key], f"record {i} key {key}")
        image = np.asarray(Image.open(io.BytesIO(record["image/encoded"][0])).convert("RGB"))
        # TensorFlow decodes JPEG with its INTEGER_FAST IDCT, Pillow with the accurate one, so pixel hashes
        # differ by rounding; the encoded bytes above are exact and the geometry must agree.
        assert list(image.shape) == reference["decoded_image_shape"]
        assert [int(record["image/height"][0]), int(record["image/width"][0]), 3] == reference["decoded_image_shape"]
        mask = np.asarray(Image.open(io.BytesIO(record["image/segmentation/class/encoded"][0])))
        assert hashlib.sha256(mask.tobytes()).hexdigest() == reference["mask_sha256"]  # PNG is lossless
    assert len(parse_example(payloads[0])["image/object/bbox/xmin"]) == 0  # record 0 has no objects


@pytest.mark.parametrize("name", PLAIN + ["examples.tfrecord.gz", "examples.tfrecord.zlib"])
def test_index_matches_golden_offsets(name: str) -> None:
    golden = VALUES[name.replace(".gz", "").replace(".zlib", "")]["index"]
    # Compressed shards index the decompressed record stream, so they share the plain file's offsets.
    assert scan_shard(DATA / name).tolist() == golden
    assert scan_shard(DATA / name, verify=True).tolist() == golden


@pytest.mark.parametrize("name", PLAIN)
def test_writer_reproduces_tensorflow_bytes(name: str, tmp_path: Path) -> None:
    payloads = [bytes(p) for p in read_records(DATA / name)]
    out = tmp_path / name
    with TFRecordWriter(out) as writer:
        for payload in payloads:
            writer.write(payload)
    assert out.read_bytes() == (DATA / name).read_bytes()
    assert read_index(index_path(out)).tolist() == VALUES[name]["index"]


@pytest.mark.parametrize("compression,decompress", [("gzip", gzip.decompress), ("zlib", zlib.decompress)])
def test_compressed_writer_decompresses_to_tensorflow_bytes(compression: str, decompress, tmp_path: Path) -> None:
    payloads = [bytes(p) for p in read_records(DATA / "examples.tfrecord")]
    out = tmp_path / "shard.tfrecord"
    with TFRecordWriter(out, compression=compression) as writer:
        for payload in payloads:
            writer.write(payload)
    # Standard tools decompress it (so TensorFlow's GZIP/ZLIB readers can) to TensorFlow's plain bytes.
    assert decompress(out.read_bytes()) == (DATA / "examples.tfrecord").read_bytes()
    assert [bytes(p) for p in read_records(out, compression=compression)] == payloads
    assert read_index(index_path(out)).tolist() == VALUES["examples.tfrecord"]["index"]
