"""Feature readers (LSTR / TeSTra .npy layout, OadTR pickles) and the window dataset, on the golden files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.features.layouts import load_pickle, read_lstr_features, read_oadtr_pickles
from datamodules.features.samples import FeatureSession, FeatureSet, FeatureWindowDataset, check_feature_set
from golden import shared_dir


GOLDEN = shared_dir() / "golden" / "oad"
VALUES = json.loads((GOLDEN / "values.json").read_text())
SPLITS = {"train": VALUES["lstr"]["train_sessions"], "test": VALUES["lstr"]["test_sessions"]}


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def read(layout: str, split: str, root: Path = GOLDEN, **kw) -> FeatureSet:
    return read_lstr_features(root, split, **kw) if layout == "lstr" else read_oadtr_pickles(root, split, **kw)


@pytest.mark.parametrize("layout", ["lstr", "oadtr"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_golden_files_read_to_values_json(layout: str, split: str) -> None:
    data = read(layout, split)
    assert data.session_names == SPLITS[split]
    assert data.class_names == VALUES["class_names"] and data.num_classes == VALUES["num_classes"]
    assert data.background_index == VALUES["background_index"] == 0
    assert data.ambiguous_index == VALUES["ambiguous_index"] == 21
    assert data.stream_dims == [VALUES["feature_dims"]["rgb"], VALUES["feature_dims"]["flow"]]
    assert data.feature_dim == 12
    for s in data.sessions:
        v = VALUES["sessions"][s.name]
        assert v["split"] == split and s.num_frames == v["T"]
        rgb, flow = (np.asarray(x) for x in s.streams)
        assert rgb.dtype == np.float32 and rgb.shape == tuple(v["rgb"]["shape"]) and sha(rgb) == v["rgb"]["sha256"]
        assert flow.dtype == np.float32 and sha(flow) == v["flow"]["sha256"]
        assert rgb[0].tolist() == v["rgb"]["first_row"] and flow[0].tolist() == v["flow"]["first_row"]
        assert float(rgb.astype(np.float64).sum()) == pytest.approx(v["rgb"]["sum"], rel=1e-12)
        assert s.targets.dtype == np.float32 and sha(s.targets) == v["target_float32_sha256"]
        assert s.labels.tolist() == v["labels"]
        assert np.flatnonzero(s.targets[:, 21] == 1).tolist() == v["ambiguous_frames"]
        features = s.features
        assert features.shape == (v["T"], 12)
        np.testing.assert_array_equal(features, np.concatenate([rgb, flow], 1))
        # readable columns: rgb[:, 0] = frame index, rgb[:, 1] = session number, flow[:, 1] = class index
        assert features[:, 0].tolist() == list(range(v["T"])) and features[:, 9].tolist() == v["labels"]


def test_both_layouts_give_the_same_arrays() -> None:
    for split in ("train", "test"):
        a, b = read("lstr", split), read("oadtr", split)
        for sa, sb in zip(a.sessions, b.sessions):
            np.testing.assert_array_equal(sa.features, sb.features)
            np.testing.assert_array_equal(sa.targets, sb.targets)


def windows_of(ds: FeatureWindowDataset) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for k, t in ds.index.tolist():
        out.setdefault(ds.session_names[k], []).append([t - ds.window + 1, t + 1])
    return out


def test_window_rules_reproduce_the_reference_data_layers() -> None:
    ref = VALUES["reference_windows"]
    data = read("oadtr", "train")
    data_test = read("oadtr", "test")
    for d in (data, data_test):
        got = windows_of(FeatureWindowDataset(d, window=16, num_future=4, frames="oadtr"))
        for name, windows in got.items():
            assert windows == ref["oadtr_enc16_dec4_seed0"][name], name
        got = windows_of(FeatureWindowDataset(d, window=8, num_future=8, frames="full_window"))
        for name, windows in got.items():
            assert windows == ref["lstr_batch_inference_work8"][name], name
    every = FeatureWindowDataset(data, window=16, num_future=4)
    assert len(every) == 90 + 57  # default: every frame of every session


@pytest.mark.parametrize("pad", ["replicate", "zeros"])
def test_window_samples(pad: str) -> None:
    data = read("lstr", "test")  # video_test_9000001, T = 44
    ds = FeatureWindowDataset(data, window=8, num_future=3, pad=pad)
    s = data.sessions[0]
    f = s.features
    for t in (0, 3, 7, 20, 42, 43):
        sample = ds[t]
        assert sample["session"].item() == 0 and sample["frame"].item() == t
        x = sample["features"].numpy()
        assert x.shape == (8, 12) and x.dtype == np.float32
        n_pad = max(0, 7 - t)
        np.testing.assert_array_equal(x[n_pad:], f[max(0, t - 7) : t + 1])
        expected_pad = np.repeat(f[:1], n_pad, 0) if pad == "replicate" else np.zeros((n_pad, 12), np.float32)
        np.testing.assert_array_equal(x[:n_pad], expected_pad)
        np.testing.assert_array_equal(sample["target"].numpy(), s.targets[t])
        fut = sample["future_target"].numpy()
        ahead = s.targets[t + 1 : t + 4]
        np.testing.assert_array_equal(fut[: len(ahead)], ahead)
        assert (fut[len(ahead) :] == 0).all() and len(fut) == 3
    batch = torch.utils.data.default_collate([ds[0], ds[43]])
    assert batch["features"].shape == (2, 8, 12) and batch["frame"].tolist() == [0, 43]
    dropped = FeatureWindowDataset(data, window=8, num_future=3, drop_ambiguous=True)
    assert dropped.index[:, 1].tolist() == list(range(4, 44))  # frames 0-3 are ambiguous


# Background, A, B, Ambiguous; frame 4 is A and ambiguous, 5 only ambiguous, 6 background and ambiguous.
MIXED_TARGETS = np.eye(4, dtype=np.float32)[[0, 0, 0, 1, 1, 3, 0, 0, 0, 0]]
MIXED_TARGETS[[4, 6], 3] = 1.0


def write_mixed_layouts(root: Path) -> None:
    """One training and one test session of ``MIXED_TARGETS`` in both layouts (LSTR .npy files, OadTR pickles)."""
    names, sessions = ["Background", "A", "B", "Ambiguous"], {"train": "video_validation_1", "test": "video_test_1"}
    split_sets = {"train_session_set": [sessions["train"]], "test_session_set": [sessions["test"]]}
    root.mkdir(parents=True)
    lstr_info = {"class_names": names, "ignore_index": 3, **split_sets}
    (root / "data_info.json").write_text(json.dumps({"THUMOS": lstr_info}))
    (root / "data_info_new.json").write_text(json.dumps({"THUMOS": {"class_index": names, **split_sets}}))
    rgb, flow = np.arange(20, dtype=np.float32).reshape(10, 2), np.ones((10, 1), np.float32)
    for folder, array in (("rgb", rgb), ("flow", flow), ("target_perframe", MIXED_TARGETS)):
        (root / folder).mkdir()
        for name in sessions.values():
            np.save(root / folder / f"{name}.npy", array)
    for tag, name in (("val", sessions["train"]), ("test", sessions["test"])):
        with open(root / f"thumos_{tag}_anno.pickle", "wb") as f:
            pickle.dump({name: {"anno": MIXED_TARGETS.copy(), "feature_length": 10}}, f, protocol=4)
        with open(root / f"thumos_all_feature_{tag}_tsn_v2.pickle", "wb") as f:
            pickle.dump({name: {"rgb": rgb, "flow": flow}}, f, protocol=4)


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_layout_drops_ambiguous_frames_as_its_reference(tmp_path: Path, split: str) -> None:
    """OadTR (dataset.py, TRNTHUMOSDataLayer): a window is dropped when ``class_h_target.argmax() != 21`` fails, i.e.
    only when the ambiguous class is the frame's top label; its loss and evaluation ignore the ambiguous column of
    the frames it keeps. LSTR drops every frame whose ambiguous column is 1 (MultipCrossEntropyLoss, and
    thumos_postprocessing before the metric)."""
    write_mixed_layouts(tmp_path / "mixed")
    lstr = read_lstr_features(tmp_path / "mixed", split, visual_feature="rgb", motion_feature="flow")
    oadtr = read_oadtr_pickles(tmp_path / "mixed", split)
    assert lstr.ambiguous_index == oadtr.ambiguous_index == 3

    def kept(data: FeatureSet) -> list[int]:
        return FeatureWindowDataset(data, window=2, num_future=1, drop_ambiguous=True).index[:, 1].tolist()

    assert kept(lstr) == [0, 1, 2, 3, 7, 8, 9]
    assert kept(oadtr) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # frame 5 alone: its argmax is the ambiguous class
    np.testing.assert_array_equal(lstr.sessions[0].targets, MIXED_TARGETS)  # LSTR's targets as in the file
    # OadTR's frames 4 and 6 are ordinary A / background frames for the loss and the metric too, which leave out
    # frames whose ambiguous column is set (the one rule downstream of the readers).
    np.testing.assert_array_equal(oadtr.sessions[0].targets[[4, 5, 6]], np.eye(4, dtype=np.float32)[[1, 3, 0]])
    oadtr_rule = FeatureWindowDataset(oadtr, window=2, num_future=1, frames="oadtr")
    assert oadtr_rule.index[:, 1].tolist() == [1, 2, 3, 4, 6, 7]  # full windows, the last Q + 1 frames left out


# -- bad input ---------------------------------------------------------------------------------------------


def copy_golden(tmp_path: Path) -> Path:
    root = tmp_path / "oad"
    shutil.copytree(GOLDEN, root)
    return root


def test_lstr_missing_feature_file_names_the_session(tmp_path: Path) -> None:
    root = copy_golden(tmp_path)
    (root / "flow_kinetics_bninception" / "video_validation_9000002.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"session 'video_validation_9000002' is listed but its feature file"):
        read_lstr_features(root, "train")
    (root / "target_perframe" / "video_test_9000001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"'video_test_9000001' is listed but its targets"):
        read_lstr_features(root, "test")


def test_lstr_length_mismatch_and_empty_rows(tmp_path: Path) -> None:
    root = copy_golden(tmp_path)
    target = root / "target_perframe" / "video_validation_9000001.npy"
    t = np.load(target)
    np.save(target, t[:-1])
    with pytest.raises(ValueError, match=r"'video_validation_9000001': features have 90 frames .* targets have 89"):
        read_lstr_features(root, "train")
    t[17] = 0.0
    np.save(target, t)
    with pytest.raises(ValueError, match=r"'video_validation_9000001': 1 target rows set no class \(first at frame 17\)"):
        read_lstr_features(root, "train")


def test_lstr_rejects_pickled_npy(tmp_path: Path) -> None:
    root = copy_golden(tmp_path)
    np.save(root / "rgb_kinetics_resnet50" / "video_test_9000001.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a plain .npy array"):
        read_lstr_features(root, "test")


def test_oadtr_bad_inputs_name_the_session(tmp_path: Path) -> None:
    root = copy_golden(tmp_path)
    feats = load_pickle(root / "thumos_all_feature_val_tsn_v2.pickle")
    annos = load_pickle(root / "thumos_val_anno.pickle")

    def dump(obj, name):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=4)

    broken = dict(feats)
    del broken["video_validation_9000002"]
    dump(broken, "thumos_all_feature_val_tsn_v2.pickle")
    with pytest.raises(KeyError, match=r"session 'video_validation_9000002' is listed but has no features"):
        read_oadtr_pickles(root, "train")

    broken = {k: dict(v) for k, v in feats.items()}
    broken["video_validation_9000001"]["flow"] = broken["video_validation_9000001"]["flow"][:80]
    dump(broken, "thumos_all_feature_val_tsn_v2.pickle")
    with pytest.raises(ValueError, match=r"'video_validation_9000001': features have 80 frames \(stream 1\)"):
        read_oadtr_pickles(root, "train")

    dump(feats, "thumos_all_feature_val_tsn_v2.pickle")
    bad = {k: dict(v) for k, v in annos.items()}
    bad["video_validation_9000002"]["anno"] = bad["video_validation_9000002"]["anno"].copy()
    bad["video_validation_9000002"]["anno"][40] = 0.0
    dump(bad, "thumos_val_anno.pickle")
    with pytest.raises(ValueError, match=r"'video_validation_9000002': 1 target rows set no class \(first at frame 40\)"):
        read_oadtr_pickles(root, "train")


def test_pickles_cannot_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"video": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        load_pickle(path)


def test_check_feature_set_errors() -> None:
    s = FeatureSession("v", [np.zeros((5, 3), np.float32)], np.eye(4, dtype=np.float32)[[0, 1, 1, 2, 3]])
    check_feature_set(FeatureSet([s], ["bg", "a", "b", "amb"], 0, 3), "x")
    with pytest.raises(ValueError, match=r"session 'v': targets have shape \(5, 4\), expected \(T, 5\)"):
        check_feature_set(FeatureSet([s], ["bg", "a", "b", "c", "amb"], 0, 4), "x")
    with pytest.raises(ValueError, match="ambiguous_index 4 outside"):
        check_feature_set(FeatureSet([s], ["bg", "a", "b", "amb"], 0, 4), "x")
    s2 = FeatureSession("w", [np.zeros((5, 2), np.float32)], s.targets)
    with pytest.raises(ValueError, match=r"session 'w': feature widths \[2\] differ"):
        check_feature_set(FeatureSet([s, s2], ["bg", "a", "b", "amb"], 0, 3), "x")
    with pytest.raises(ValueError, match="frames must be one of"):
        FeatureWindowDataset(FeatureSet([s], ["bg", "a", "b", "amb"]), frames="every")
