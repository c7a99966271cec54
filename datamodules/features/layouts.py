"""Pre-extracted per-frame features on disk: the two layouts people have, read into a :class:`FeatureSet`.

* :func:`read_lstr_features`: the LSTR / TeSTra layout (REFERENCE §9.1; golden ``oad/README.md``):
  ``root/<data_info>.json`` = ``{"THUMOS": {"class_names", "ignore_index", "train_session_set",
  "test_session_set", ...}}``, one plain ``.npy`` per session and stream in ``root/<visual_feature>/`` and
  ``root/<motion_feature>/`` (memory-mapped, as LSTR does), ``root/<target_perframe>/<session>.npy``
  ``(T, C)`` one-hot (float64 in the wild; float32 here).
* :func:`read_oadtr_pickles`: OadTR's layout: ``data_info_new.json`` (``class_index`` = the class names),
  ``thumos_{val|test}_anno.pickle`` = ``{session: {"anno": (T, C), "feature_length": T}}`` and
  ``thumos_all_feature_{val|test}_tsn_v2.pickle`` = ``{session: {"rgb": (T, 2048), "flow": (T, 1024)}}``.
  THUMOS'14's *validation* videos are the training set, so split ``"train"`` reads the ``val`` pickles.
  Pickles are read with an unpickler that only builds NumPy arrays and plain containers.

Ambiguous frames follow each layout's reference. Downstream of the readers one rule holds (the window dataset, the
task's loss and its metric): a frame whose ambiguous column is set is ambiguous (not trained on, not evaluated).

* LSTR: exactly that, on the targets as stored: its loss drops every frame with ``target[:, ignore_index] == 1``
  (criterions/criterions.py ``MultipCrossEntropyLoss``) and so does its THUMOS evaluation
  (evaluation/postprocessing.py ``thumos_postprocessing``, "Remove ambiguous (21)").
* OadTR: a window is dropped only when the current frame's top label is the ambiguous class (dataset.py L39-40,
  ``if class_h_target.argmax() != 21``: NumPy's argmax, the first column on ties); a frame it keeps is trained on
  and evaluated with its other labels (util/loss.py leaves the ambiguous column out of the loss, the metric never
  scores it). :func:`read_oadtr_pickles` therefore clears the ambiguous column of every frame whose argmax is
  another class (e.g. an action frame also marked ambiguous), so the one rule above gives OadTR's.

The sessions, their checks and the windows: :mod:`datamodules.features.samples`.
"""

from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodules.features.samples import FeatureSession, FeatureSet, check_feature_set

SPLIT_KEYS = {"train": "train_session_set", "test": "test_session_set"}


def read_data_info(path: str | Path, dataset: str | None = None) -> dict:
    """The dataset entry of a data-info json (``{"THUMOS": {...}}``); ``dataset=None`` takes the only one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data-info json {path} not found")
    info = json.loads(path.read_text())
    if dataset is None:
        if len(info) != 1:
            raise ValueError(f"{path}: holds datasets {sorted(info)}; name the one to read (dataset=...)")
        dataset = next(iter(info))
    if dataset not in info:
        raise KeyError(f"{path}: no dataset {dataset!r} (has {sorted(info)})")
    return info[dataset]


def _split_sessions(info: dict, split: str, sessions: Sequence[str] | None, source: Path) -> list[str]:
    if sessions is not None:
        return list(sessions)
    if split not in SPLIT_KEYS:
        raise ValueError(f"split must be one of {sorted(SPLIT_KEYS)} (or give sessions=...), got {split!r}")
    if SPLIT_KEYS[split] not in info:
        raise KeyError(f"{source}: no {SPLIT_KEYS[split]!r} list")
    return list(info[SPLIT_KEYS[split]])


def _class_index(names: list[str], index: int | None, wanted: str) -> int | None:
    """``index`` as given; None: the class named ``wanted`` (any case) if there is one; -1: none."""
    if index == -1:
        return None
    if index is not None:
        return index
    lowered = [n.lower() for n in names]
    return lowered.index(wanted) if wanted in lowered else None


def _targets(array: np.ndarray, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ValueError(f"{where}: targets have dtype {array.dtype}, expected numbers")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_lstr_features(root: str | Path, split: str = "train", *, data_info: str = "data_info.json",
                       dataset: str | None = None, visual_feature: str | None = "rgb_kinetics_resnet50",
                       motion_feature: str | None = "flow_kinetics_bninception",
                       target_perframe: str = "target_perframe", sessions: Sequence[str] | None = None,
                       background_index: int | None = 0, ambiguous_index: int | None = None,
                       mmap: bool = True) -> FeatureSet:
    """Read one split of the LSTR / TeSTra layout (``DATA.DATA_ROOT`` = ``root``).

    Args:
        root: the folder holding ``data_info`` and the feature / target folders.
        split: ``"train"`` or ``"test"`` (the ``*_session_set`` list of the data-info json).
        data_info: the data-info json's name in ``root`` (``data_info.json``).
        dataset: key in the json (``"THUMOS"``); None takes the only one.
        visual_feature / motion_feature: stream folders (``INPUT.VISUAL_FEATURE`` / ``MOTION_FEATURE``);
            None or "" leaves a stream out. Streams are concatenated visual then motion.
        target_perframe: target folder (``INPUT.TARGET_PERFRAME``).
        sessions: read these sessions instead of the split's list.
        background_index: background column (-1 for none).
        ambiguous_index: ambiguous column; None takes the json's ``ignore_index`` (else a class named
            "Ambiguous"); -1 for none.
        mmap: memory-map the feature files (LSTR's ``mmap_mode="r"``) instead of reading them.
    """
    root = Path(root)
    info_path = root / data_info
    info = read_data_info(info_path, dataset)
    if "class_names" not in info:
        raise KeyError(f"{info_path}: no 'class_names' list")
    names = list(info["class_names"])
    if ambiguous_index is None and "ignore_index" in info:
        ambiguous_index = int(info["ignore_index"])
    folders = [f for f in (visual_feature, motion_feature) if f]
    if not folders:
        raise ValueError("read_lstr_features: give visual_feature and/or motion_feature")
    out = []
    for name in _split_sessions(info, split, sessions, info_path):
        streams = []
        for folder in folders + [target_perframe]:
            path = root / folder / f"{name}.npy"
            if not path.is_file():
                kind = "targets" if folder == target_perframe else "feature file"
                raise FileNotFoundError(f"{info_path}: session {name!r} is listed but its {kind} {path} is missing")
            try:
                streams.append(np.load(path, mmap_mode="r" if mmap and folder != target_perframe else None,
                                       allow_pickle=False))
            except ValueError as err:
                raise ValueError(f"{path}: not a plain .npy array ({err})") from err
        targets = _targets(streams.pop(), f"{root / target_perframe / name}.npy")
        out.append(FeatureSession(name, streams, targets))
    data = FeatureSet(out, names, _class_index(names, background_index, "background"),
                      _class_index(names, ambiguous_index, "ambiguous"))
    return check_feature_set(data, str(root))


class _ArrayUnpickler(pickle.Unpickler):
    """Builds NumPy arrays, dicts, lists and numbers only: a pickle cannot run code through this reader."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays and plain "
                                         "containers are expected in a feature or annotation pickle")
        if int(np.__version__.split(".")[0]) >= 2 and module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed numpy.core (no warning)
        elif int(np.__version__.split(".")[0]) < 2 and module.startswith("numpy._core."):
            module = "numpy.core." + module[len("numpy._core."):]
        return getattr(importlib.import_module(module), name)


def load_pickle(path: str | Path) -> object:
    """Read a pickle of NumPy arrays and plain containers (OadTR's protocol-4 pickles, numpy 1.x or 2.x)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle {path} not found")
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from err


def read_oadtr_pickles(root: str | Path, split: str = "train", *, data_info: str = "data_info_new.json",
                       dataset: str | None = None, feature_file: str | None = None, anno_file: str | None = None,
                       streams: Sequence[str] = ("rgb", "flow"), sessions: Sequence[str] | None = None,
                       background_index: int | None = 0, ambiguous_index: int | None = None) -> FeatureSet:
    """Read one split of OadTR's pickles (``--thumos_data_path`` / ``--thumos_anno_path`` in one folder).

    Args:
        root: the folder holding the json and the pickles.
        split: ``"train"`` (reads the ``val`` pickles: THUMOS'14 validation videos) or ``"test"``.
        data_info: the data-info json's name (``data_info_new.json``; ``class_index`` lists the class names).
        dataset: key in the json (``"THUMOS"``); None takes the only one.
        feature_file: feature pickle name; default ``thumos_all_feature_{val|test}_tsn_v2.pickle`` (OadTR's
            default ``--feature Anet2016_feature_v2``; ``..._tsn_v2_resize.pickle``, ``..._V3.pickle`` or
            ``thumos_all_feature_{val|test}.pickle`` for its other features).
        anno_file: annotation pickle name; default ``thumos_{val|test}_anno.pickle``.
        streams: keys of each session's feature dict, concatenated in this order.
        sessions: read these sessions instead of the split's list.
        background_index: background column (-1 for none).
        ambiguous_index: ambiguous column; None: the class named "Ambiguous" (OadTR hard-codes 21); -1: none.
            A frame is ambiguous only when this is its top label (argmax), as OadTR's data layer decides: on any
            other frame the column is cleared (module docstring).
    """
    root = Path(root)
    info_path = root / data_info
    info = read_data_info(info_path, dataset)
    if "class_index" not in info:
        raise KeyError(f"{info_path}: no 'class_index' list (OadTR's list of class names)")
    names = list(info["class_index"])
    tag = {"train": "val", "test": "test"}.get(split, split)
    feature_path = root / (feature_file or f"thumos_all_feature_{tag}_tsn_v2.pickle")
    anno_path = root / (anno_file or f"thumos_{tag}_anno.pickle")
    session_names = _split_sessions(info, split, sessions, info_path)
    features, annos = load_pickle(feature_path), load_pickle(anno_path)
    for path, obj in ((feature_path, features), (anno_path, annos)):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict session -> entry, got {type(obj).__name__}")
    out = []
    for name in session_names:
        if name not in features:
            raise KeyError(f"{info_path}: session {name!r} is listed but has no features in {feature_path}")
        if name not in annos:
            raise KeyError(f"{info_path}: session {name!r} is listed but has no annotation in {anno_path}")
        entry, anno = features[name], annos[name]
        missing = [k for k in streams if k not in entry]
        if missing:
            raise KeyError(f"{feature_path}: session {name!r} has no stream {missing[0]!r} (has {sorted(entry)})")
        if "anno" not in anno:
            raise KeyError(f"{anno_path}: session {name!r} has no 'anno' array")
        targets = _targets(anno["anno"], f"{anno_path} session {name!r}")
        length = anno.get("feature_length")
        if length is not None and int(length) != targets.shape[0]:
            raise ValueError(f"{anno_path}: session {name!r}: feature_length {int(length)} but {targets.shape[0]} "
                             "annotated frames")
        out.append(FeatureSession(name, [np.asarray(entry[k]) for k in streams], targets))
    data = FeatureSet(out, names, _class_index(names, background_index, "background"),
                      _class_index(names, ambiguous_index, "ambiguous"))
    data = check_feature_set(data, f"{feature_path} / {anno_path}")
    if data.ambiguous_index is not None:
        for session in data.sessions:
            other = session.targets.argmax(1) != data.ambiguous_index  # OadTR keeps these frames
            session.targets[other, data.ambiguous_index] = 0.0
    return data
