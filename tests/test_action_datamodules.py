"""Feature DataModules for online action detection: both on-disk layouts (golden files), the synthetic streams, the
SequenceExample shards written by tools/make_tfrecords.py, splits, frame rules and bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import (LSTRFeatureDataModule, OadTRFeatureDataModule, SyntheticStreamsDataModule,
                         TFRecordFeatureDataModule)
from datamodules.features.samples import FeatureSession, FeatureSet, holdout_sessions
from datamodules.synthetic.streams import make_feature_streams
from datamodules.tfrecord import TFRecordWriter, build_sequence_example, write_sharded
from datamodules.features.tfrecord import read_feature_records, session_examples
from golden import shared_dir

ROOT = Path(__file__).resolve().parents[1]


GOLDEN = shared_dir() / "golden" / "oad"
VALUES = json.loads((GOLDEN / "values.json").read_text())
SMALL = dict(window=8, num_future=4, batch_size=16, num_workers=0)


def load_make_tfrecords():
    spec = importlib.util.spec_from_file_location("make_tfrecords", ROOT / "tools" / "make_tfrecords.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_samples(ds) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))])


def assert_same_windows(a, b) -> None:
    assert a.session_names == b.session_names and len(a) == len(b)
    sa, sb = all_samples(a), all_samples(b)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_golden_layouts_give_the_same_splits_and_windows() -> None:
    lstr, oadtr = LSTRFeatureDataModule(str(GOLDEN), **SMALL), OadTRFeatureDataModule(str(GOLDEN), **SMALL)
    for dm in (lstr, oadtr):
        assert (dm.num_classes, dm.feature_dim, dm.background_index, dm.ambiguous_index) == (22, 12, 0, 21)
        assert dm.class_names == VALUES["class_names"]
        train, val = dm.feature_set("train").session_names, dm.feature_set("val").session_names
        assert sorted(train + val) == VALUES["lstr"]["train_sessions"] and len(val) == 1
        assert dm.feature_set("test").session_names == VALUES["lstr"]["test_sessions"]
    for split in ("train", "val", "test"):
        assert_same_windows(lstr.dataset(split), oadtr.dataset(split))
    test = all_samples(lstr.dataset("test"))
    t = VALUES["sessions"]["video_test_9000001"]["T"]
    assert test["frame"].tolist() == list(range(t))  # frames="all": every frame of the test video
    assert test["target"].argmax(1).tolist() == VALUES["sessions"]["video_test_9000001"]["labels"]
    # the current frame is the last window row; frame 0's window repeats frame 0 (replicate padding)
    assert test["features"][:, -1, 0].tolist() == list(range(t))
    assert test["features"][0, :, 0].tolist() == [0.0] * 8
    # training windows leave out ambiguous current frames (OadTR does too; they carry no current-frame loss)
    train = all_samples(lstr.dataset("train"))
    assert (train["target"][:, 21] == 0).all()
    session = lstr.feature_set("train").sessions[0]
    assert len(train["frame"]) == session.num_frames - int(session.targets[:, 21].sum())


def test_frame_rules_and_predict_split() -> None:
    full = LSTRFeatureDataModule(str(GOLDEN), frames="full_window", predict_split="val", **SMALL)
    ds = full.dataset("test")
    assert all_samples(ds)["frame"].tolist() == list(range(7, 44))
    assert "first 7 of each session left out" in full.frame_rule("test")
    full.setup("predict")
    assert full.predict_set.session_names == full.feature_set("val").session_names
    oadtr = LSTRFeatureDataModule(str(GOLDEN), frames="oadtr", **SMALL)
    frames = all_samples(oadtr.dataset("test"))["frame"].tolist()
    assert frames == list(range(7, 44 - 4 - 1))  # full windows, the last Q + 1 frames dropped, as released
    with pytest.raises(ValueError, match="frames must be one of"):
        LSTRFeatureDataModule(str(GOLDEN), frames="every")


def test_validation_split_is_seeded_and_can_be_named() -> None:
    names = [f"video_{i:03d}" for i in range(20)]
    a, b = holdout_sessions(names, 0.1, seed=0), holdout_sessions(names, 0.1, seed=0)
    assert a == b and len(a) == 2 and set(a) <= set(names)
    assert holdout_sessions(names, 0.1, seed=1) != a
    assert len(holdout_sessions(names[:2], 0.1, 0)) == 1 and len(holdout_sessions(names[:3], 0.9, 0)) == 2
    with pytest.raises(ValueError, match="cannot hold some out"):
        holdout_sessions(names[:1], 0.1, 0)
    named = LSTRFeatureDataModule(str(GOLDEN), val_sessions=["video_validation_9000002"], **SMALL)
    assert named.feature_set("val").session_names == ["video_validation_9000002"]
    assert named.feature_set("train").session_names == ["video_validation_9000001"]
    with pytest.raises(ValueError, match="are not training sessions"):
        LSTRFeatureDataModule(str(GOLDEN), val_sessions=["video_test_9000001"], **SMALL).feature_set("val")


def test_class_arguments_override_the_data() -> None:
    names = [f"c{i}" for i in range(22)]
    dm = OadTRFeatureDataModule(str(GOLDEN), class_names=names, ambiguous_index=-1, background_index=-1, **SMALL)
    assert dm.class_names == names and dm.ambiguous_index is None and dm.background_index is None
    with pytest.raises(ValueError, match="class_names has 3 names but the targets have 22 columns"):
        _ = OadTRFeatureDataModule(str(GOLDEN), class_names=["a", "b", "c"], **SMALL).num_classes
    with pytest.raises(ValueError, match="ambiguous_index 30 outside"):
        _ = LSTRFeatureDataModule(str(GOLDEN), ambiguous_index=30, **SMALL).num_classes


def copy_golden(tmp_path: Path) -> Path:
    root = tmp_path / "oad"
    shutil.copytree(GOLDEN, root)
    return root


def test_bad_input_errors_name_the_session(tmp_path: Path) -> None:
    root = copy_golden(tmp_path)
    (root / "rgb_kinetics_resnet50" / "video_validation_9000002.npy").unlink()
    with pytest.raises(FileNotFoundError, match="video_validation_9000002.*feature file .* is missing"):
        LSTRFeatureDataModule(str(root), **SMALL).setup("fit")
    root = copy_golden(tmp_path / "b")
    targets = np.load(root / "target_perframe" / "video_test_9000001.npy")
    np.save(root / "target_perframe" / "video_test_9000001.npy", targets[:-3])
    with pytest.raises(ValueError, match="video_test_9000001.*features have 44 frames .* targets have 41"):
        LSTRFeatureDataModule(str(root), **SMALL).setup("test")
    targets[5] = 0
    np.save(root / "target_perframe" / "video_test_9000001.npy", targets)
    with pytest.raises(ValueError, match="video_test_9000001.*1 target rows set no class \\(first at frame 5\\)"):
        LSTRFeatureDataModule(str(root), **SMALL).setup("test")


def test_synthetic_splits_are_disjoint_seeded_and_share_the_classes() -> None:
    dm = SyntheticStreamsDataModule(num_train=4, num_val=2, num_test=3, min_frames=30, max_frames=40, **SMALL)
    again = SyntheticStreamsDataModule(num_train=4, num_val=2, num_test=3, min_frames=30, max_frames=40, **SMALL)
    names = {s: dm.feature_set(s).session_names for s in ("train", "val", "test")}
    assert [len(v) for v in names.values()] == [4, 2, 3]
    assert len({n for v in names.values() for n in v}) == 9  # three seed streams, no shared session
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(dm.feature_set(split).sessions[0].features,
                                      again.feature_set(split).sessions[0].features)
    assert (dm.num_classes, dm.feature_dim, dm.background_index, dm.ambiguous_index) == (6, 16, 0, 5)
    ds = dm.dataset("val")
    assert len(ds) == sum(s.num_frames for s in dm.feature_set("val").sessions)
    sample = ds[0]
    assert sample["features"].shape == (8, 16) and sample["future_target"].shape == (4, 6)


def test_make_tfrecords_features_round_trip_both_layouts(tmp_path: Path) -> None:
    tool = load_make_tfrecords()
    paths = {}
    for layout in ("lstr", "oadtr"):
        for split in ("train", "test"):
            out = tmp_path / layout / split
            paths[layout, split] = tool.main(["features", "--layout", layout, "--root", str(GOLDEN), "--split", split,
                                              "--out", str(out), "--num-shards", "2", "--no-progress"])
    assert len(paths["lstr", "train"]) == 2 and all(Path(p + ".index").exists() for p in paths["lstr", "train"])
    lstr = LSTRFeatureDataModule(str(GOLDEN), **SMALL)
    for layout in ("lstr", "oadtr"):
        shards = TFRecordFeatureDataModule(str(tmp_path / layout / "train-*.tfrecord"),
                                           str(tmp_path / layout / "test-*.tfrecord"), **SMALL)
        assert (shards.num_classes, shards.feature_dim, shards.ambiguous_index) == (22, 12, 21)
        assert shards.class_names == VALUES["class_names"]
        test = shards.feature_set("test").sessions[0]
        reference = lstr.feature_set("test").sessions[0]
        np.testing.assert_array_equal(test.features, reference.features)
        np.testing.assert_array_equal(test.targets, reference.targets)
        assert [len(s) for s in [test.streams[0][0], test.streams[1][0]]] == [8, 4]
        # 2 shards deal the 2 training videos round-robin: sorted names match, the held-out one too
        assert sorted(shards.feature_set("train").session_names + shards.feature_set("val").session_names) == \
            VALUES["lstr"]["train_sessions"]
        assert_same_windows(shards.dataset("test"), lstr.dataset("test"))


def test_synthetic_shards_and_val_files(tmp_path: Path) -> None:
    tool = load_make_tfrecords()
    for name, seed in (("train", 0), ("val", 1), ("test", 2)):
        tool.main(["features", "--layout", "synthetic", "--num-sessions", "3", "--seed", str(seed),
                   "--out", str(tmp_path / name), "--compression", "gzip", "--no-progress"])
    dm = TFRecordFeatureDataModule(str(tmp_path / "train-*"), str(tmp_path / "test-*"), val_files=str(tmp_path / "val-*"),
                                   **SMALL)
    assert len(dm.feature_set("train").sessions) == 3 and len(dm.feature_set("val").sessions) == 3
    expected = make_feature_streams(3, seed=1)
    for a, b in zip(dm.feature_set("val").sessions, expected.sessions):
        assert a.name == b.name
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.targets, b.targets)


def _record(name: str, features: np.ndarray, labels=None, targets=None, num_frames=None, classes=("bg", "a", "amb"),
            dims=None):
    context = {"session/name": name.encode(), "session/num_frames": int(num_frames if num_frames is not None else len(features)),
               "session/stream_dims": [int(features.shape[1])] if dims is None else dims,
               "classes/names": [c.encode() for c in classes], "classes/background_index": 0,
               "classes/ambiguous_index": 2}
    lists = {"frame/features": [row for row in features.astype(np.float32)]}
    if labels is not None:
        lists["frame/label"] = [[int(x)] for x in labels]
    if targets is not None:
        lists["frame/target"] = [row for row in targets.astype(np.float32)]
    return build_sequence_example(context, lists)


def _write(path: Path, *records) -> str:
    with TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)
    return str(path)


def test_integer_frame_labels_are_read_as_one_hot_targets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 3))
    data = read_feature_records(_write(tmp_path / "a.tfrecord", _record("v1", features, labels=[0, 1, 1, 2, 0])))
    s = data.sessions[0]
    np.testing.assert_array_equal(s.targets, np.eye(3, dtype=np.float32)[[0, 1, 1, 2, 0]])
    np.testing.assert_array_equal(s.features, features.astype(np.float32))
    assert data.class_names == ["bg", "a", "amb"] and data.ambiguous_index == 2


def test_bad_records_name_the_shard_record_and_session(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(4, 3))
    one_hot = np.eye(3)[[0, 1, 1, 0]]
    cases = [
        (_record("v1", f, targets=one_hot, num_frames=5), "record 0 session 'v1': 4 frame/features steps but "
                                                          "session/num_frames is 5"),
        (_record("v1", f, targets=one_hot[:3]), "session 'v1': 3 frame/target steps but 4 frames"),
        (_record("v1", f, targets=one_hot, dims=[2]), "session 'v1': frame/features of frame 0 has 3 values, expected 2"),
        (_record("v1", f, labels=[0, 1, 3, 0]), "session 'v1': frame/label 3 at frame 2 is outside \\[0, 3\\)"),
        (_record("v1", f), "session 'v1': neither frame/target nor frame/label"),
        (_record("v1", f, targets=np.eye(3)[[0, 1, 1, 0]] * [[1], [1], [0], [1]]), "session 'v1': 1 target rows set no "
                                                                                 "class \\(first at frame 2\\)"),
    ]
    for k, (record, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{k}.tfrecord", record)
        with pytest.raises(ValueError, match=message):
            read_feature_records(path)
    good = _record("v1", f, targets=one_hot)
    with pytest.raises(ValueError, match="dup.tfrecord record 1: session 'v1' again \\(first in .*record 0\\)"):
        read_feature_records(_write(tmp_path / "dup.tfrecord", good, good))
    other = _record("v2", f, targets=one_hot, classes=("bg", "b", "amb"))
    with pytest.raises(ValueError, match="record 1 session 'v2': class_names .* differs from"):
        read_feature_records(_write(tmp_path / "mixed.tfrecord", good, other))


def test_session_examples_keep_multi_hot_targets(tmp_path: Path) -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0.5], [0, 1, 0]], np.float32)  # a soft / multi-hot row survives as is
    data = FeatureSet([FeatureSession("v", [np.ones((3, 2), np.float32), np.zeros((3, 1), np.float32)], targets)],
                      ["bg", "a", "b"], 0, None, [2, 1])
    paths = write_sharded(session_examples(data), str(tmp_path / "m"), 1)
    back = read_feature_records(paths)
    np.testing.assert_array_equal(back.sessions[0].targets, targets)
    assert back.stream_dims == [2, 1] and back.ambiguous_index is None
