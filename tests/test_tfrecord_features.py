"""The tf.Example codec: conversion of every feature kind, protobuf merge rules, specs, builders (C scanner and upb)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.tfrecord import (
    FeatureError,
    FixedLen,
    VarLen,
    WireFormatError,
    build_example,
    build_sequence_example,
    bytes_feature,
    float_feature,
    int64_feature,
    parse_example,
    parse_sequence_example,
    to_feature,
)
from datamodules.tfrecord import example_pb2
from datamodules.tfrecord import features as features_module


@pytest.fixture(scope="module", autouse=True, params=["scanner", "upb"])
def backend(request):
    """Every test here runs twice: through the C scanner (with its upb fallback) and through upb alone."""
    if request.param == "scanner" and features_module._wire is None:
        pytest.skip("the _wire extension is not built")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "upb":
            patch.setattr(features_module, "_wire", None)
        yield request.param

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
FEATURE = st.one_of(
    st.lists(st.binary(max_size=24), max_size=4).map(bytes_feature),
    st.lists(INT64, max_size=12).map(int64_feature),
    st.lists(FLOAT32, max_size=12).map(float_feature),
    st.just(example_pb2.Feature()),  # a Feature with no kind set
)
FEATURES = st.dictionaries(st.text(max_size=8), FEATURE, max_size=6)


def natural_from_protobuf(features: example_pb2.Features) -> dict:
    """What parse_example(spec=None) must return, computed by the protobuf runtime."""
    out = {}
    for key, feature in features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feature.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.array(feature.float_list.value, dtype=np.float32)
        elif kind == "int64_list":
            out[key] = np.array(feature.int64_list.value, dtype=np.int64)
        else:
            out[key] = []
    return out


def assert_same(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        if isinstance(value, np.ndarray):
            assert isinstance(ours[key], np.ndarray) and ours[key].dtype == value.dtype, key
            if value.dtype == np.float32:  # bit patterns: -0.0 and infinities compare exactly; NaN is NaN
                nan = np.isnan(value)
                assert np.array_equal(np.isnan(ours[key]), nan), key
                assert ours[key][~nan].view(np.uint32).tolist() == value[~nan].view(np.uint32).tolist(), key
            else:
                assert ours[key].tolist() == value.tolist(), key
        else:
            assert ours[key] == value, key


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FEATURES)
def test_parse_converts_every_feature_exactly(features: dict) -> None:
    example = build_example(features)
    payload = example.SerializeToString()
    reference = natural_from_protobuf(example_pb2.Example.FromString(payload).features)
    assert_same(parse_example(payload), reference)
    assert_same(parse_example(memoryview(bytearray(payload))), reference)  # the reader hands out memoryviews


@settings(max_examples=50, deadline=None)
@given(FEATURES, FEATURES)
def test_concatenated_messages_merge_like_protobuf(first: dict, second: dict) -> None:
    # Concatenating serialized messages merges them: maps replace per key, features of one kind append.
    payload = build_example(first).SerializeToString() + build_example(second).SerializeToString()
    reference = natural_from_protobuf(example_pb2.Example.FromString(payload).features)
    assert_same(parse_example(payload), reference)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    tag = _varint(number << 3 | wire_type)
    return tag + (_varint(len(body)) + body if wire_type == 2 else body)


def _example_with(key: str, feature_body: bytes, extra: bytes = b"") -> bytes:
    entry = _field(1, 2, key.encode()) + _field(2, 2, feature_body)
    return _field(1, 2, _field(1, 2, entry) + extra)


@settings(max_examples=50, deadline=None)
@given(st.lists(INT64, max_size=8), st.lists(FLOAT32, max_size=8))
def test_unpacked_lists_and_unknown_fields(ints: list[int], floats: list[float]) -> None:
    # Writers may legally emit unpacked repeated scalars and unknown fields; both runtimes must agree.
    int_list = b"".join(_field(1, 0, _varint(v)) for v in ints) + _field(7, 0, _varint(5))
    float_list = b"".join(_field(1, 5, struct.pack("<f", v)) for v in floats) + _field(9, 2, b"junk")
    payload = _example_with("i", _field(3, 2, int_list), extra=_field(15, 5, b"\0\0\0\0")) + \
        _example_with("f", _field(2, 2, float_list)) + _field(99, 1, b"\0" * 8)
    reference = natural_from_protobuf(example_pb2.Example.FromString(payload).features)
    assert_same(parse_example(payload), reference)
    assert parse_example(payload)["i"].tolist() == ints


@settings(max_examples=60, deadline=None)
@given(FEATURES, st.data())
def test_damaged_payloads_fail_or_agree_with_protobuf(features: dict, data: st.DataObject) -> None:
    payload = bytearray(build_example(features).SerializeToString())
    if payload and data.draw(st.booleans()):
        del payload[data.draw(st.integers(0, len(payload) - 1)):]  # truncate
    elif payload:
        payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))  # flip bits
    try:
        reference = natural_from_protobuf(example_pb2.Example.FromString(bytes(payload)).features)
    except (DecodeError, UnicodeDecodeError):  # the pure-Python protobuf backend raises the latter for bad keys
        with pytest.raises(WireFormatError):
            parse_example(payload)
    else:
        assert_same(parse_example(payload), reference)


@settings(max_examples=60, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=200))
def test_int64_lists_keep_extremes(values: list[int]) -> None:
    # Extremes need all 10 varint bytes.
    values = values + [-(2**63), 2**63 - 1, -1, 0, 1, 127, 128, 2**35]
    parsed = parse_example(build_example({"v": int64_feature(values)}).SerializeToString())
    assert parsed["v"].tolist() == values


@pytest.mark.skipif(api_implementation.Type() == "python",
                    reason="the pure-Python protobuf backend keeps floats as Python floats, quieting signalling NaNs")
def test_float_bits_survive_exactly_including_nan_payloads() -> None:
    bits = [0x7F814000, 0xFFC00001, 0x80000000, 0x7F800000, 0x00000001]  # signalling NaN, NaN, -0, inf, denormal
    body = _field(1, 2, struct.pack("<5I", *bits))  # packed FloatList
    assert parse_example(_example_with("f", _field(2, 2, body)))["f"].view(np.uint32).tolist() == bits


def test_truncated_packed_varint_is_a_wire_error() -> None:
    body = _field(1, 2, b"\x01" * 20 + b"\x80")  # packed list ending in a continuation byte
    with pytest.raises(WireFormatError, match="not a valid tf.Example"):
        parse_example(_example_with("v", _field(3, 2, body)))


def test_parsed_arrays_are_writable_and_own_their_values() -> None:
    payload = build_example({"i": [1, 2, 3], "f": [0.5, 1.5]}).SerializeToString()
    first = parse_example(payload)
    first["i"][0], first["f"][0] = 99, 9.5  # a transform may work in place
    second = parse_example(payload)
    assert second["i"].tolist() == [1, 2, 3] and second["f"].tolist() == [0.5, 1.5]


def test_spec_missing_required_key_names_it() -> None:
    payload = build_example({"a": [1]}).SerializeToString()
    with pytest.raises(FeatureError, match="required feature 'label' is missing") as info:
        parse_example(payload, {"label": FixedLen((), "int64")})
    assert info.value.key == "label"
    with pytest.raises(FeatureError, match="required feature 'boxes' is missing"):
        parse_example(payload, {"boxes": VarLen("float", required=True)})


def test_spec_wrong_type_and_size_name_the_key() -> None:
    payload = build_example({"a": [1, 2, 3], "b": b"x"}).SerializeToString()
    with pytest.raises(FeatureError, match=r"feature 'a' holds a int64_list but the spec asks for float"):
        parse_example(payload, {"a": FixedLen((3,), "float")})
    with pytest.raises(FeatureError, match=r"feature 'a' has 3 values but FixedLen shape \(2, 2\) needs 4"):
        parse_example(payload, {"a": FixedLen((2, 2), "int64")})
    with pytest.raises(FeatureError, match=r"feature 'b' holds a bytes_list"):
        parse_example(payload, {"b": "int64"})


def test_spec_defaults_shapes_and_types() -> None:
    payload = build_example({"m": np.arange(6, dtype=np.int64), "s": "héllo", "f": [0.5, -0.0]}).SerializeToString()
    out = parse_example(payload, {
        "m": FixedLen((2, 3), "int64"),
        "s": FixedLen((), "bytes"),
        "f": VarLen("float"),
        "absent_int": FixedLen((2,), "int64", default=7),
        "absent_bytes": FixedLen((), "bytes", default="none"),
        "absent_var": VarLen("bytes"),
        "absent_float": "float",
    })
    assert out["m"].shape == (2, 3) and out["m"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["s"] == "héllo".encode()
    assert out["f"].view(np.uint32).tolist() == [0x3F000000, 0x80000000]
    assert out["absent_int"].tolist() == [7, 7] and out["absent_int"].dtype == np.int64
    assert out["absent_bytes"] == b"none"
    assert out["absent_var"] == [] and out["absent_float"].dtype == np.float32 and out["absent_float"].size == 0
    # Defaults are copied per record, so mutating one sample cannot change the next.
    out["absent_int"][0] = 99
    assert parse_example(payload, {"absent_int": FixedLen((2,), "int64", default=7)})["absent_int"].tolist() == [7, 7]


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        FixedLen((), "float64")
    with pytest.raises(ValueError, match="does not fit shape"):
        FixedLen((3,), "float", default=[1.0, 2.0])
    with pytest.raises(TypeError, match="spec for 'x'"):
        parse_example(b"", {"x": int})


def test_sequence_example_specs() -> None:
    seq = build_sequence_example(
        context={"id": b"v1", "n": 3},
        feature_lists={"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "tags": [[b"a"], [b"b", b"c"], [b"d"]]},
    )
    payload = seq.SerializeToString()
    context, lists = parse_sequence_example(
        payload,
        context={"id": FixedLen((), "bytes"), "n": FixedLen((), "int64")},
        sequence={"x": FixedLen((2,), "float"), "tags": VarLen("bytes"), "missing": FixedLen((4,), "float", default=0.0)},
    )
    assert context["id"] == b"v1" and int(context["n"]) == 3
    assert lists["x"].shape == (3, 2) and lists["x"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert lists["tags"] == [[b"a"], [b"b", b"c"], [b"d"]]
    assert lists["missing"].shape == (0, 4)
    with pytest.raises(FeatureError, match=r"feature 'x\[0\]' has 2 values"):
        parse_sequence_example(payload, sequence={"x": FixedLen((3,), "float")})
    with pytest.raises(FeatureError, match="required feature list 'y' is missing"):
        parse_sequence_example(payload, sequence={"y": FixedLen((), "int64")})
    # Without specs every list comes back step by step, as the protobuf runtime sees it.
    reference = example_pb2.SequenceExample.FromString(payload)
    _, natural = parse_sequence_example(payload)
    assert [step.tolist() for step in natural["x"]] == \
        [list(f.float_list.value) for f in reference.feature_lists.feature_list["x"].feature]


def test_to_feature_inference_and_errors() -> None:
    assert to_feature(b"x").WhichOneof("kind") == "bytes_list"
    assert to_feature("é").bytes_list.value == ["é".encode()]
    assert to_feature([True, 2]).int64_list.value == [1, 2]
    assert to_feature(np.array([1.5], dtype=np.float64)).float_list.value == [1.5]
    assert to_feature(np.zeros((2, 2), dtype=np.uint8)).int64_list.value == [0, 0, 0, 0]
    assert to_feature([1, 2.5]).float_list.value == [1.0, 2.5]
    with pytest.raises(ValueError, match="empty list"):
        to_feature([])
    with pytest.raises(ValueError, match=r"feature 'big'.*outside"):
        build_example({"big": [2**63]})
    with pytest.raises(TypeError, match=r"feature 'mixed'"):
        build_example({"mixed": [1, b"x"]})

