"""Per-frame feature sessions as TFRecord shards of ``tf.SequenceExample``: encoder, decoder, DataModule.

One record per session (video). Context (per session):

* ``session/name`` bytes; ``session/num_frames`` int64 T; ``session/stream_dims`` int64 list (the widths
  of the concatenated feature streams, e.g. ``[2048, 1024]``);
* ``classes/names`` bytes list (one per target column); ``classes/background_index`` and
  ``classes/ambiguous_index`` int64 (-1: none).

Feature lists (one step per frame, T steps):

* ``frame/features`` float, the frame's feature vector (width ``sum(stream_dims)``);
* ``frame/target`` float, the frame's target row (one-, multi-hot or soft, one value per class). A record
  without it may carry ``frame/label`` int64 (one class index per frame, as other converters write) instead.

``tools/make_tfrecords.py features`` writes them from either on-disk layout or the synthetic streams
(:func:`session_examples`); a record decodes to the ``FeatureSession`` it was made from, and the DataModule
cuts the same windows as the on-disk DataModules. Errors name the shard, the record and the session.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from datamodules.features.datamodules import FeatureDataModule
from datamodules.features.samples import FeatureSession, FeatureSet, check_feature_set
from datamodules.tfrecord import (
    FixedLen,
    VarLen,
    build_sequence_example,
    bytes_feature,
    expand_files,
    float_feature,
    int64_feature,
    normalize_spec,
    parse_sequence_example,
)
from datamodules.tfrecord.example_pb2 import SequenceExample
from datamodules.tfrecord.reader import RecordReader, parse_record
from datamodules.tfrecord_shards import TFRecordShards

CONTEXT = normalize_spec({
    "session/name": FixedLen((), "bytes"),
    "session/num_frames": FixedLen((), "int64"),
    "session/stream_dims": VarLen("int64"),
    "classes/names": VarLen("bytes"),
    "classes/background_index": FixedLen((), "int64", default=0),
    "classes/ambiguous_index": FixedLen((), "int64", default=-1),
})
SEQUENCE = normalize_spec({
    "frame/features": VarLen("float"),
    "frame/target": VarLen("float"),
    "frame/label": VarLen("int64"),
})


def session_example(session: FeatureSession, data: FeatureSet) -> SequenceExample:
    """One session of ``data`` as a SequenceExample (keys in the module docstring)."""
    features, targets = session.features, np.asarray(session.targets, dtype=np.float32)
    return build_sequence_example(
        context={
            "session/name": bytes_feature(session.name),
            "session/num_frames": int64_feature(session.num_frames),
            "session/stream_dims": int64_feature(list(data.stream_dims)),
            "classes/names": bytes_feature(list(data.class_names)),
            "classes/background_index": int64_feature(-1 if data.background_index is None else data.background_index),
            "classes/ambiguous_index": int64_feature(-1 if data.ambiguous_index is None else data.ambiguous_index),
        },
        feature_lists={"frame/features": [float_feature(row) for row in features],
                       "frame/target": [float_feature(row) for row in targets]},
    )


def session_examples(data: FeatureSet) -> Iterator[SequenceExample]:
    """A SequenceExample per session of ``data``, in order (``tools/make_tfrecords.py features``)."""
    for session in data.sessions:
        yield session_example(session, data)


def _rows(steps: list[np.ndarray], width: int, what: str, where: str) -> np.ndarray:
    widths = {len(s) for s in steps}
    if widths - {width}:
        t = next(i for i, s in enumerate(steps) if len(s) != width)
        raise ValueError(f"{where}: {what} of frame {t} has {len(steps[t])} values, expected {width}")
    return np.stack(steps).astype(np.float32) if steps else np.zeros((0, width), np.float32)


def decode_session(payload: memoryview | bytes, where: str = "record") -> tuple[FeatureSession, dict]:
    """A parsed record -> ``(FeatureSession, class info)``; the class info is ``{"class_names",
    "background_index", "ambiguous_index", "stream_dims"}`` (indices None for -1).

    Raises:
        ValueError naming ``where`` and the session: lengths that disagree with ``session/num_frames``, steps
        of the wrong width, no targets, labels outside the classes.
    """
    context, lists = parse_sequence_example(payload, CONTEXT, SEQUENCE)
    name = context["session/name"].decode("utf-8", errors="replace")
    where = f"{where} session {name!r}"
    names = [n.decode("utf-8", errors="replace") for n in context["classes/names"]]
    dims = [int(d) for d in context["session/stream_dims"]]
    if not names:
        raise ValueError(f"{where}: no classes/names")
    if not dims:
        raise ValueError(f"{where}: no session/stream_dims")
    length = int(context["session/num_frames"])
    features = lists["frame/features"]
    if len(features) != length:
        raise ValueError(f"{where}: {len(features)} frame/features steps but session/num_frames is {length}")
    matrix = _rows(features, sum(dims), "frame/features", where)
    if lists["frame/target"]:
        if len(lists["frame/target"]) != length:
            raise ValueError(f"{where}: {len(lists['frame/target'])} frame/target steps but {length} frames")
        targets = _rows(lists["frame/target"], len(names), "frame/target", where)
    elif lists["frame/label"]:
        labels = lists["frame/label"]
        if len(labels) != length or any(len(x) != 1 for x in labels):
            raise ValueError(f"{where}: frame/label needs one class index per frame ({length} frames)")
        labels = np.concatenate(labels)
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if len(bad):
            raise ValueError(f"{where}: frame/label {int(labels[bad[0]])} at frame {int(bad[0])} is outside "
                             f"[0, {len(names)})")
        targets = np.eye(len(names), dtype=np.float32)[labels]
    else:
        raise ValueError(f"{where}: neither frame/target nor frame/label")
    # One stream per stored width, as views of the concatenated matrix (FeatureSession.features re-joins them).
    bounds = np.cumsum([0, *dims])
    streams = [matrix[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    info = {"class_names": names, "stream_dims": dims,
            "background_index": None if int(context["classes/background_index"]) < 0
            else int(context["classes/background_index"]),
            "ambiguous_index": None if int(context["classes/ambiguous_index"]) < 0
            else int(context["classes/ambiguous_index"])}
    return FeatureSession(name, streams, targets), info


def read_feature_records(files: str | Sequence[str]) -> FeatureSet:
    """Every session of the shards (paths or globs, plain / ``.gz`` / ``.zlib``) as one checked FeatureSet.

    Sessions keep the order of the files and records. All records must agree on the classes and the stream
    widths, and session names must be unique; errors name the shard and record.
    """
    sessions, info, first = [], None, ""
    seen: dict[str, str] = {}
    for path in expand_files(files):
        reader = RecordReader(path, "auto")
        for record, offset, payload in reader:
            where = f"{path} record {record}"
            session, found = parse_record(lambda p: decode_session(p, where), payload, reader.path, record, offset)
            if session.name in seen:
                raise ValueError(f"{where}: session {session.name!r} again (first in {seen[session.name]})")
            seen[session.name] = where
            if info is None:
                info, first = found, where
            elif found != info:
                diff = [k for k in info if info[k] != found[k]]
                raise ValueError(f"{where} session {session.name!r}: {diff[0]} {found[diff[0]]!r} differs from "
                                 f"{first}'s {info[diff[0]]!r}")
            sessions.append(session)
    if info is None:
        raise ValueError(f"no records in {files}")
    data = FeatureSet(sessions, info["class_names"], info["background_index"], info["ambiguous_index"])
    return check_feature_set(data, f"TFRecord shards {files}")


class TFRecordFeatureDataModule(FeatureDataModule):
    """Online action detection on SequenceExample shards (one session per record, see the module docstring).

    Sessions are read whole into memory when a split is first used. Splits, frame rules and class overrides
    as :class:`~datamodules.features.datamodules.FeatureDataModule`; with ``val_files`` the validation sessions are
    those shards' (no hold-out from the training ones).

    Args:
        train_files: training shards (paths or globs).
        test_files: test shards.
        val_files: validation shards; None holds out ``val_sessions`` / a seeded ``val_fraction`` of the
            training sessions.

    Shards as :mod:`datamodules.tfrecord_shards` takes them; a record is a whole session, so there is no record
    shuffle here (``seed`` is the validation hold-out's, as for every feature DataModule).
    """

    def __init__(self, train_files: str | list[str], test_files: str | list[str],
                 val_files: str | list[str] | None = None, window: int = 64, num_future: int = 8,
                 frames: str = "all", train_frames: str = "all", pad: str = "replicate",
                 val_sessions: list[str] | None = None, val_fraction: float = 0.1, seed: int = 0,
                 predict_split: str = "test", class_names: list[str] | None = None,
                 background_index: int | None = None, ambiguous_index: int | None = None, batch_size: int = 128,
                 num_workers: int = 2, pin_memory: bool = False) -> None:
        super().__init__(window=window, num_future=num_future, frames=frames, train_frames=train_frames, pad=pad,
                         val_sessions=val_sessions, val_fraction=val_fraction, seed=seed, predict_split=predict_split,
                         class_names=class_names, background_index=background_index, ambiguous_index=ambiguous_index,
                         batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.shards = TFRecordShards({"train": train_files, "test": test_files, "val": val_files})

    def read_split(self, split: str) -> FeatureSet:
        return read_feature_records(self.shards.files[split])

    def feature_set(self, split: str) -> FeatureSet:
        if self.shards.files["val"] is None or split not in ("train", "val"):
            return super().feature_set(split)
        if split not in self._sets:
            self._sets[split] = self._relabel(read_feature_records(self.shards.files[split]),
                                              f"TFRecordFeatureDataModule {split} split")
        return self._sets[split]
