"""tf.Example / tf.SequenceExample codec: feature specs, parsing with a spec, and builders.

tf.Examples are scanned in place by the C extension ``_wire`` (built at install; see ``_wire.c``),
which copies each wanted value once: the protobuf runtime (upb) copies a 100 KB payload three times
on its way to a Python ``bytes`` and materialises every feature, wanted or not. The scanner handles
the layout all writers produce and answers None for anything else (unpacked or split lists, repeated
map keys, groups, damaged data), which is then parsed by upb with the classes generated from
``example.proto``; without a compiler everything goes through upb. Either way protobuf's rules apply:
packed and unpacked lists, merged repeated messages, last-wins map keys, unknown fields ignored. A
pure-Python wire parser was measured slower than upb (44 vs 35 us CPU per 100 KB record).

A spec maps feature keys to :class:`FixedLen` (exactly ``prod(shape)`` values, reshaped; ``default``
used when the key is absent, required when ``default`` is None) or :class:`VarLen` (any number of
values, 1-D; empty when absent unless ``required``). ``"bytes"``, ``"int64"`` or ``"float"`` alone
means ``VarLen`` of that type. Values come back as ``np.int64`` / ``np.float32`` arrays, and bytes
features as ``bytes`` (shape ``()``) or ``list[bytes]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
from google.protobuf.message import DecodeError

from . import example_pb2

try:
    from . import _wire
except ImportError:  # built without a C compiler: upb parses every record
    _wire = None

BYTES, INT64, FLOAT = "bytes", "int64", "float"
DTYPES = (BYTES, INT64, FLOAT)
_DTYPE_OF_KIND = {"bytes_list": BYTES, "float_list": FLOAT, "int64_list": INT64, None: None}  # Feature's oneof
_LIST_NAME = {BYTES: "bytes_list", FLOAT: "float_list", INT64: "int64_list"}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_NUMPY_DTYPE = {FLOAT: np.float32, INT64: np.int64}


class WireFormatError(ValueError):
    """A payload that is not a valid serialized tf.Example / tf.SequenceExample."""


class FeatureError(ValueError):
    """A record that does not fit the feature spec: missing required key, wrong type or wrong size."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (type(self), (self.key, str(self)))


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


@dataclass(frozen=True, eq=False)
class FixedLen:
    """A feature with exactly ``prod(shape)`` values of ``dtype``; ``default`` fills it when absent (None: required)."""

    shape: tuple[int, ...] = ()
    dtype: str = FLOAT
    default: Any = None

    def __post_init__(self) -> None:
        shape = (self.shape,) if isinstance(self.shape, int) else tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"FixedLen shape must be non-negative, got {shape}")
        if self.dtype == BYTES and len(shape) > 1:
            raise ValueError(f"bytes features have shape () or (n,), got {shape}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "size", math.prod(shape))
        _check_dtype(self.dtype)
        if self.default is not None:
            object.__setattr__(self, "default", self._normalize_default(self.default))

    def _normalize_default(self, default: Any) -> Any:
        if self.dtype == BYTES:
            if not self.shape:
                return _as_bytes(default)
            values = [_as_bytes(v) for v in default]
            if len(values) != self.size:
                raise ValueError(f"default has {len(values)} values, shape {self.shape} needs {self.size}")
            return tuple(values)
        array = np.asarray(default, dtype=np.int64 if self.dtype == INT64 else np.float32)
        try:
            return np.broadcast_to(array, self.shape).copy()
        except ValueError:
            raise ValueError(f"default of shape {array.shape} does not fit shape {self.shape}") from None


@dataclass(frozen=True)
class VarLen:
    """A feature with any number of ``dtype`` values (1-D); empty when absent unless ``required``."""

    dtype: str = FLOAT
    required: bool = False

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)


Spec = Union[FixedLen, VarLen, str]


class _NormalizedSpec(dict):
    """A spec already checked and expanded to FixedLen/VarLen values (so per-record parsing skips that)."""


def normalize_spec(spec: Mapping[str, Spec] | None) -> dict[str, FixedLen | VarLen] | None:
    """Check a spec and expand dtype names to ``VarLen``; pass the result to parse many records faster."""
    if spec is None or type(spec) is _NormalizedSpec:
        return spec
    out = _NormalizedSpec()
    for key, value in spec.items():
        if isinstance(value, str):
            value = VarLen(value)
        if not isinstance(value, (FixedLen, VarLen)):
            raise TypeError(f"spec for {key!r} must be FixedLen, VarLen or a dtype name, got {value!r}")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Parsing.


def _floats(float_list: example_pb2.FloatList) -> np.ndarray:
    """float32 values with their exact bits (NaN payloads too, with protobuf's default upb backend), fast for long lists.

    Going through Python floats would widen to double and back, which quiets signalling NaNs; the
    packed wire bytes are the float32 values themselves. FloatList serializes as one packed field,
    ``0x0A <varint length> <little-endian float32s>``.
    """
    data = float_list.SerializeToString()
    if not data:
        return np.empty(0, np.float32)
    n, i = data[1], 2
    if n >= 0x80:
        n, shift = n & 0x7F, 7
        while i < len(data):
            byte = data[i]
            i += 1
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
    if data[0] != 0x0A or i + n != len(data) or n % 4:  # not the packed layout: convert value by value
        return np.array(float_list.value[:], dtype=np.float32)
    return np.frombuffer(data, "<f4", n // 4, i).astype(np.float32)  # astype copies: writable, native order


def _values(feature: example_pb2.Feature, dtype: str) -> np.ndarray | list[bytes]:
    """A Feature's values as ``dtype`` (an unset Feature gives an empty list)."""
    if dtype == BYTES:
        return feature.bytes_list.value[:]
    if dtype == FLOAT:
        return _floats(feature.float_list)
    return np.array(feature.int64_list.value[:], dtype=np.int64)  # [:] -> list: much faster than iterating


def _natural(feature: example_pb2.Feature) -> np.ndarray | list[bytes]:
    """Values of a feature in its own type (no spec); an empty Feature gives ``[]``."""
    dtype = _DTYPE_OF_KIND[feature.WhichOneof("kind")]
    return [] if dtype is None else _values(feature, dtype)


def _missing(key: str, spec: FixedLen | VarLen) -> Any:
    if type(spec) is VarLen:
        if spec.required:
            raise FeatureError(key, f"required feature {key!r} is missing")
        return [] if spec.dtype == BYTES else np.empty(0, _NUMPY_DTYPE[spec.dtype])
    if spec.default is None:
        raise FeatureError(key, f"required feature {key!r} is missing")
    if spec.dtype == BYTES:
        return spec.default if not spec.shape else list(spec.default)
    return spec.default.copy()


def _wrong_kind(key: str, found: str, dtype: str) -> FeatureError:
    return FeatureError(key, f"feature {key!r} holds a {_LIST_NAME[found]} but the spec asks for {dtype} "
                             f"({_LIST_NAME[dtype]})")


def _fit(key: str, values: Any, spec: FixedLen | VarLen) -> Any:
    """Values of the spec's dtype, checked against a FixedLen's size and reshaped."""
    if type(spec) is VarLen:
        return values
    if len(values) != spec.size:
        raise FeatureError(key, f"feature {key!r} has {len(values)} values but FixedLen shape {spec.shape} "
                                f"needs {spec.size}")
    if spec.dtype == BYTES:
        return values[0] if not spec.shape else values
    return values.reshape(spec.shape)


def _apply_spec(key: str, feature: example_pb2.Feature | None, spec: FixedLen | VarLen) -> Any:
    if feature is None:
        return _missing(key, spec)
    dtype = spec.dtype
    # Reading the expected list of a Feature holding another kind gives an empty list without changing it,
    # so the kind is only checked when nothing came back (cheaper than asking first, on every feature).
    if dtype == BYTES:
        values = feature.bytes_list.value[:]
    elif dtype == FLOAT:
        values = _floats(feature.float_list)
    else:
        values = np.array(feature.int64_list.value[:], dtype=np.int64)
    if not len(values):
        found = _DTYPE_OF_KIND[feature.WhichOneof("kind")]
        if found is not None and found != dtype:
            raise _wrong_kind(key, found, dtype)
    return _fit(key, values, spec)


def _scanned(kind: str | None, raw: Any) -> np.ndarray | list[bytes]:
    """Values as ``_wire`` hands them over: bytes as a list, numbers as a bytearray NumPy wraps in place."""
    if kind == BYTES:
        return raw
    if kind == FLOAT:
        return np.frombuffer(raw, "<f4")  # the wire's float32 bits; writable, as the bytearray is
    return [] if kind is None else np.frombuffer(raw, np.int64)


def _apply_scanned(key: str, item: tuple[str | None, Any] | None, spec: FixedLen | VarLen) -> Any:
    if item is None:
        return _missing(key, spec)
    kind, raw = item
    dtype = spec.dtype
    if kind != dtype:
        if kind is not None:
            raise _wrong_kind(key, kind, dtype)
        values = [] if dtype == BYTES else np.empty(0, _NUMPY_DTYPE[dtype])  # a Feature with no list set
    else:
        values = _scanned(kind, raw)
    return _fit(key, values, spec)


def _from_string(message_type, payload: bytes | bytearray | memoryview, name: str):
    try:
        return message_type.FromString(payload)
    except (DecodeError, UnicodeDecodeError) as err:  # the pure-Python backend reports bad UTF-8 keys so
        raise WireFormatError(f"not a valid {name}: {err}") from None


def _parse_features(features, spec: Mapping[str, FixedLen | VarLen] | None) -> dict[str, Any]:
    feature_map = features.feature
    if spec is None:
        return {key: _natural(feature) for key, feature in feature_map.items()}
    # `in` then [] beats .get on upb maps ([] alone would insert a missing key).
    return {key: _apply_spec(key, feature_map[key] if key in feature_map else None, s) for key, s in spec.items()}


def parse_example(payload: bytes | bytearray | memoryview, features: Mapping[str, Spec] | None = None) -> dict[str, Any]:
    """Parse a serialized tf.Example into ``{key: value}``; ``features`` is a spec (None: every key, own type).

    Raises :class:`WireFormatError` for an undecodable payload and :class:`FeatureError` (with
    ``.key``) for a missing required key, a wrong type or a wrong FixedLen size. For many records,
    pass a spec made once with :func:`normalize_spec`.
    """
    spec = normalize_spec(features)
    found = _wire.example_features(payload, spec) if _wire is not None else None
    if found is None:  # no extension, or a layout the scanner leaves to upb
        return _parse_features(_from_string(example_pb2.Example, payload, "tf.Example").features, spec)
    if spec is None:
        return {key: _scanned(kind, raw) for key, (kind, raw) in found.items()}
    get = found.get
    return {key: _apply_scanned(key, get(key), s) for key, s in spec.items()}


def _apply_sequence_spec(key: str, feature_list: example_pb2.FeatureList | None, spec: FixedLen | VarLen) -> Any:
    if feature_list is None:
        required = spec.required if type(spec) is VarLen else spec.default is None
        if required:
            raise FeatureError(key, f"required feature list {key!r} is missing")
        steps = []
    else:
        steps = feature_list.feature
    values = [_apply_spec(f"{key}[{t}]", step, spec) for t, step in enumerate(steps)]
    if type(spec) is VarLen or spec.dtype == BYTES:
        return values
    return np.stack(values) if values else np.empty((0, *spec.shape), _NUMPY_DTYPE[spec.dtype])


def parse_sequence_example(
    payload: bytes | bytearray | memoryview,
    context: Mapping[str, Spec] | None = None,
    sequence: Mapping[str, Spec] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse a serialized tf.SequenceExample into ``(context, feature_lists)`` dicts.

    ``context`` is a spec as for :func:`parse_example`. In ``sequence`` a spec describes one step:
    ``FixedLen(shape)`` gives an array ``(T, *shape)`` (a list for bytes), ``VarLen`` a list of per-step
    arrays. A missing feature list is an error for ``FixedLen`` without default and ``VarLen(required=True)``,
    otherwise it reads as zero steps. None specs return every key in its own type (lists of steps).
    """
    context_spec, sequence_spec = normalize_spec(context), normalize_spec(sequence)
    example = _from_string(example_pb2.SequenceExample, payload, "tf.SequenceExample")
    lists = example.feature_lists.feature_list
    if sequence_spec is None:
        seq = {key: [_natural(step) for step in feature_list.feature] for key, feature_list in lists.items()}
    else:
        seq = {key: _apply_sequence_spec(key, lists[key] if key in lists else None, s) for key, s in sequence_spec.items()}
    return _parse_features(example.context, context_spec), seq


# ---------------------------------------------------------------------------------------------------
# Building messages.


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return bytes(value)
    raise TypeError(f"expected bytes or str, got {type(value).__name__}")


def _as_list(values: Any) -> list:
    if isinstance(values, (str, bytes, bytearray, memoryview)) or np.isscalar(values):
        return [values]
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist()
    return list(values)


def bytes_feature(values: bytes | str | Iterable[bytes | str]) -> example_pb2.Feature:
    """A Feature holding a bytes_list (str values are UTF-8 encoded)."""
    feature = example_pb2.Feature()
    feature.bytes_list.value.extend(_as_bytes(v) for v in _as_list(values))
    return feature


def int64_feature(values: int | Iterable[int] | np.ndarray) -> example_pb2.Feature:
    """A Feature holding an int64_list."""
    array = np.asarray(values)
    if array.dtype.kind not in "iub" and array.size:
        raise TypeError(f"int64 feature values must be integers, got dtype {array.dtype}")
    items = [int(v) for v in _as_list(values)]
    if any(v < _INT64_MIN or v > _INT64_MAX for v in items):
        raise ValueError("int64 feature value outside [-2**63, 2**63 - 1]")
    feature = example_pb2.Feature()
    feature.int64_list.value.extend(items)
    return feature


def float_feature(values: float | Iterable[float] | np.ndarray) -> example_pb2.Feature:
    """A Feature holding a float_list (values are stored as float32)."""
    feature = example_pb2.Feature()
    feature.float_list.value.extend(np.asarray(values, dtype=np.float32).reshape(-1).tolist())
    return feature


def to_feature(value: Any) -> example_pb2.Feature:
    """A Feature from a value, by type: bytes/str -> bytes_list, ints/bools -> int64_list, floats -> float_list.

    Accepts scalars, lists and NumPy arrays; a ready ``example_pb2.Feature`` is kept. An empty list has
    no type: use :func:`bytes_feature`, :func:`int64_feature` or :func:`float_feature`, or a typed array.
    """
    if isinstance(value, example_pb2.Feature):
        return value
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        if kind == "f":
            return float_feature(value)
        if kind in "iub":
            return int64_feature(value)
        if kind in "SUO":
            return bytes_feature(value.reshape(-1).tolist())
        raise TypeError(f"cannot store an array of dtype {value.dtype} in a Feature")
    items = _as_list(value)
    if not items:
        raise ValueError("cannot infer the type of an empty list: use bytes_feature/int64_feature/float_feature")
    first = items[0]
    if isinstance(first, (str, bytes, bytearray, memoryview, np.bytes_)):
        return bytes_feature(items)
    if all(isinstance(v, (bool, int, np.integer)) for v in items):
        return int64_feature(items)
    if all(isinstance(v, (bool, int, float, np.integer, np.floating)) for v in items):
        return float_feature(items)
    raise TypeError(f"cannot infer a Feature type for values of types {sorted({type(v).__name__ for v in items})}")


def _fill_features(target: example_pb2.Features, features: Mapping[str, Any]) -> None:
    for key, value in features.items():
        try:
            target.feature[key].CopyFrom(to_feature(value))
        except (TypeError, ValueError) as err:
            raise type(err)(f"feature {key!r}: {err}") from None


def build_example(features: Mapping[str, Any]) -> example_pb2.Example:
    """A tf.Example from ``{key: value}`` (types inferred by :func:`to_feature`)."""
    example = example_pb2.Example()
    _fill_features(example.features, features)
    return example


def build_sequence_example(
    context: Mapping[str, Any] | None = None, feature_lists: Mapping[str, Sequence[Any]] | None = None
) -> example_pb2.SequenceExample:
    """A tf.SequenceExample from context values and ``{key: [value per step, ...]}`` feature lists."""
    example = example_pb2.SequenceExample()
    _fill_features(example.context, context or {})
    for key, steps in (feature_lists or {}).items():
        feature_list = example.feature_lists.feature_list[key]
        for t, step in enumerate(steps):
            try:
                feature_list.feature.add().CopyFrom(to_feature(step))
            except (TypeError, ValueError) as err:
                raise type(err)(f"feature list {key!r}, step {t}: {err}") from None
    return example
