"""The C tf.Example scanner (``_wire``): it takes the layout writers produce and leaves everything else to upb."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.tfrecord import WireFormatError, build_example, example_pb2, parse_example, read_records
from datamodules.tfrecord import features as features_module

from test_tfrecord_features import FEATURES, _example_with, _field, _varint, assert_same, natural_from_protobuf

_wire = features_module._wire
GOLDEN = Path(__file__).parent / "data" / "tfrecord"


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_extension_is_built_where_a_compiler_exists() -> None:
    # setup.py marks the extension optional so installs never fail; this makes a failed build visible.
    assert _wire is not None, "datamodules.tfrecord._wire was not built: rerun `make install` and read the compiler output"


needs_wire = pytest.mark.skipif(_wire is None, reason="the _wire extension is not built")


@needs_wire
@pytest.mark.parametrize("name", ["examples.tfrecord", "object_detection.tfrecord"])
def test_scanner_takes_tensorflow_written_records_and_agrees_with_upb(name: str) -> None:
    payloads = [bytes(p) for p in read_records(GOLDEN / name)]
    assert payloads
    for i, payload in enumerate(payloads):
        found = _wire.example_features(payload, None)
        assert found is not None, f"record {i} fell back to upb"
        reference = natural_from_protobuf(example_pb2.Example.FromString(payload).features)
        assert_same({key: features_module._scanned(*item) for key, item in found.items()}, reference)


@needs_wire
@settings(max_examples=40, deadline=None)
@given(FEATURES)
def test_scanner_takes_what_protobuf_writes(features: dict) -> None:
    payload = build_example(features).SerializeToString()
    found = _wire.example_features(memoryview(payload), None)
    assert found is not None  # the fast path, not the fallback
    assert set(found) == set(build_example(features).features.feature)


@needs_wire
@pytest.mark.parametrize("case", ["unpacked ints", "unpacked floats", "two runs", "key twice", "two kinds", "group",
                                  "bad utf-8 key", "key field twice", "truncated", "field 0"])
def test_scanner_leaves_unusual_layouts_to_upb(case: str) -> None:
    ints = _field(3, 2, _field(1, 0, _varint(5)) + _field(1, 0, _varint(6)))
    payloads = {
        "unpacked ints": _example_with("i", ints),
        "unpacked floats": _example_with("f", _field(2, 2, _field(1, 5, struct.pack("<f", 1.5)))),
        "two runs": _example_with("i", _field(3, 2, _field(1, 2, b"\x01") + _field(1, 2, b"\x02"))),
        "key twice": _example_with("k", _field(3, 2, _field(1, 2, b"\x01"))) + _example_with("k", _field(1, 2, b"")),
        "two kinds": _example_with("k", _field(3, 2, b"") + _field(2, 2, b"")),
        "group": _example_with("k", b"", extra=bytes([0x1B, 0x1C])),  # field 3 start group, end group
        "bad utf-8 key": _field(1, 2, _field(1, 2, _field(1, 2, b"\xff") + _field(2, 2, b""))),
        # upb checks every occurrence of the key, not only the last one that counts.
        "key field twice": _field(1, 2, _field(1, 2, _field(1, 2, b"\xff") + _field(1, 2, b"k") + _field(2, 2, b""))),
        "truncated": _example_with("k", _field(1, 2, _field(1, 2, b"abc")))[:-1],
        "field 0": _example_with("k", b"") + bytes([0x00, 0x00]),
    }
    payload = payloads[case]
    assert _wire.example_features(payload, None) is None
    try:
        reference = natural_from_protobuf(example_pb2.Example.FromString(payload).features)
    except DecodeError:
        with pytest.raises(WireFormatError):
            parse_example(payload)
    else:
        assert_same(parse_example(payload), reference)


@needs_wire
def test_scanner_copies_only_wanted_keys_but_checks_them_all() -> None:
    payload = build_example({"a": [1, 2], "big": b"x" * 1000, "f": [0.5]}).SerializeToString()
    assert set(_wire.example_features(payload, {"a": None, "zz": None})) == {"a"}
    assert _wire.example_features(payload, {"a": None})["a"][0] == "int64"
    # Damage in a key nobody asked for is still damage, as upb sees it.
    broken = payload + _example_with("other", _field(3, 2, _field(1, 2, b"\x01\x80")))
    with pytest.raises(WireFormatError, match="not a valid tf.Example"):
        parse_example(broken, {"a": "int64"})



@needs_wire
@settings(max_examples=300, deadline=None)
@given(FEATURES, st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=3)),
                          min_size=1, max_size=3))
def test_scanner_on_damaged_payloads_is_upb_or_steps_aside(features: dict, edits: list) -> None:
    # Flipped and inserted bytes: whatever the scanner accepts, upb must read to the same values.
    payload = bytearray(build_example(features).SerializeToString())
    for flip, position, data in edits:
        if flip and payload:
            payload[position % len(payload)] ^= data[0] or 1
        else:
            payload[position % (len(payload) + 1):position % (len(payload) + 1)] = data
    found = _wire.example_features(payload, None)
    if found is not None:
        reference = natural_from_protobuf(example_pb2.Example.FromString(bytes(payload)).features)
        assert_same({key: features_module._scanned(*item) for key, item in found.items()}, reference)
