"""Pre-extracted per-frame features for online action detection: the two layouts people have, and windows.

Readers return a :class:`FeatureSet` (sessions = videos, each with its feature streams and per-frame
targets, plus the class names and the background / "ambiguous" class indices):

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

Streams are concatenated (rgb then flow) into one feature vector per frame, as OadTR does.
:class:`FeatureWindowDataset` cuts the windows a windowed model sees, at stride 1. The DataModules over
both layouts (:class:`LSTRFeatureDataModule`, :class:`OadTRFeatureDataModule`) share :class:`FeatureDataModule`
with the synthetic streams' and the TFRecord one (``datamodules.synthetic.streams``,
``datamodules.features.tfrecord``).
"""

from __future__ import annotations

import importlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule

PAD_MODES = ("replicate", "zeros")
FRAME_RULES = ("all", "full_window", "oadtr")
SPLIT_KEYS = {"train": "train_session_set", "test": "test_session_set"}


@dataclass
class FeatureSession:
    """One video: feature streams ``[(T, D_i)]`` (arrays or memory maps) and targets ``(T, C)`` float32."""

    name: str
    streams: list[np.ndarray]
    targets: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.targets.shape[0])

    @property
    def features(self) -> np.ndarray:
        """``(T, sum D_i)`` float32: the streams concatenated (read into memory)."""
        return np.concatenate([np.asarray(s, dtype=np.float32) for s in self.streams], axis=1)

    @property
    def labels(self) -> np.ndarray:
        """``(T,)`` int64 class index of each frame (argmax of its target row)."""
        return self.targets.argmax(1)


@dataclass
class FeatureSet:
    """Sessions of one split with the class list: what every reader (and the synthetic generator) returns.

    Attributes:
        sessions: the sessions, in data-info order.
        class_names: C names, one per target column (background and ambiguous included).
        background_index: the background column (not an action), or None.
        ambiguous_index: the ambiguous column (not trained on, not evaluated), or None.
    """

    sessions: list[FeatureSession]
    class_names: list[str]
    background_index: int | None = 0
    ambiguous_index: int | None = None
    stream_dims: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return int(sum(self.stream_dims))

    @property
    def session_names(self) -> list[str]:
        return [s.name for s in self.sessions]

    def __getitem__(self, name: str) -> FeatureSession:
        for s in self.sessions:
            if s.name == name:
                return s
        raise KeyError(f"no session {name!r} in this feature set ({len(self.sessions)} sessions)")

    def select(self, names: Sequence[str]) -> FeatureSet:
        """The same set restricted to ``names`` (in that order), e.g. a validation split."""
        return FeatureSet([self[n] for n in names], list(self.class_names), self.background_index,
                          self.ambiguous_index, list(self.stream_dims))


def check_feature_set(data: FeatureSet, source: str) -> FeatureSet:
    """Validate sessions against the class list; errors name ``source``, the session and the problem.

    Checks: every session has at least one stream; streams and targets have the same number of frames;
    streams have the same widths in every session; targets have one column per class; every target row
    sets a class. Fills ``data.stream_dims``.
    """
    c = data.num_classes
    for name, index in (("background_index", data.background_index), ("ambiguous_index", data.ambiguous_index)):
        if index is not None and not 0 <= index < c:
            raise ValueError(f"{source}: {name} {index} outside [0, {c}) for {c} classes")
    if not data.sessions:
        raise ValueError(f"{source}: no session")
    dims = None
    for s in data.sessions:
        where = f"{source}: session {s.name!r}"
        if not s.streams:
            raise ValueError(f"{where}: no feature stream")
        t = s.targets
        if t.ndim != 2 or t.shape[1] != c:
            raise ValueError(f"{where}: targets have shape {tuple(t.shape)}, expected (T, {c}) for {c} classes")
        for k, stream in enumerate(s.streams):
            if stream.ndim != 2:
                raise ValueError(f"{where}: feature stream {k} has shape {tuple(stream.shape)}, expected (T, D)")
            if stream.shape[0] != t.shape[0]:
                raise ValueError(f"{where}: features have {stream.shape[0]} frames (stream {k}) but targets have "
                                 f"{t.shape[0]}")
        widths = [int(x.shape[1]) for x in s.streams]
        if dims is None:
            dims = widths
        elif widths != dims:
            raise ValueError(f"{where}: feature widths {widths} differ from the other sessions' {dims}")
        empty = np.flatnonzero(t.sum(1) <= 0)
        if len(empty):
            raise ValueError(f"{where}: {len(empty)} target rows set no class (first at frame {int(empty[0])})")
        if not np.isfinite(t).all():
            raise ValueError(f"{where}: targets contain NaN or inf")
    data.stream_dims = dims or []
    return data


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
    return check_feature_set(data, f"{feature_path} / {anno_path}")


class FeatureWindowDataset(Dataset):
    """Windows of T frames at stride 1 ending at each evaluated frame, for a windowed model such as OadTR.

    Sample ``i`` (a dict of tensors):
        ``features`` ``(T, D)`` float32: frames ``t - T + 1 .. t`` (the last row is the current frame t);
        ``target`` ``(C,)``: frame t's targets; ``future_target`` ``(Q, C)``: frames ``t + 1 .. t + Q``
        (all-zero rows past the end of the video: unlabelled); ``session`` (int64, index into
        ``session_names``) and ``frame`` (int64, t), so predictions can be put back per video.

    Which frames get a sample (``frames``):
        ``"all"`` (default): every frame; a window reaching before frame 0 is padded at the start (``pad``).
        Online detection must answer from the first frame, and this evaluates every frame.
        ``"full_window"``: frames ``T - 1 .. end`` only (the first T - 1 frames are never evaluated).
        ``"oadtr"``: exactly the released OadTR data layer's samples: frames ``T - 1 .. end - Q - 2``
        (window starts ``0 .. end - Q - T - 1``), without those whose current frame is ambiguous.

    Padding (``pad``, the same rule as ``StreamingOadTR``): ``"replicate"`` repeats frame 0 (frame indices
    clipped at 0), ``"zeros"`` uses zero feature vectors.

    Args:
        data: the sessions (a reader's or the synthetic generator's :class:`FeatureSet`).
        window: T (OadTR: 64).
        num_future: Q anticipated frames (OadTR: 8).
        frames: ``"all"``, ``"full_window"`` or ``"oadtr"``.
        pad: ``"replicate"`` or ``"zeros"``.
        drop_ambiguous: also leave out frames whose target is ambiguous (always so for ``"oadtr"``).
    """

    def __init__(self, data: FeatureSet, window: int = 64, num_future: int = 8, frames: str = "all",
                 pad: str = "replicate", drop_ambiguous: bool = False) -> None:
        if frames not in FRAME_RULES:
            raise ValueError(f"FeatureWindowDataset: frames must be one of {FRAME_RULES}, got {frames!r}")
        if pad not in PAD_MODES:
            raise ValueError(f"FeatureWindowDataset: pad must be one of {PAD_MODES}, got {pad!r}")
        if window < 1 or num_future < 0:
            raise ValueError(f"FeatureWindowDataset: window must be >= 1 and num_future >= 0, got {window}, "
                             f"{num_future}")
        self.data = data
        self.window, self.num_future, self.frames, self.pad = window, num_future, frames, pad
        self.drop_ambiguous = drop_ambiguous or frames == "oadtr"
        index = []
        for k, s in enumerate(data.sessions):
            n = s.num_frames
            if frames == "all":
                t = np.arange(n)
            elif frames == "full_window":
                t = np.arange(window - 1, n)
            else:
                t = np.arange(window - 1, n - num_future - 1)
            if self.drop_ambiguous and data.ambiguous_index is not None:
                t = t[s.targets[t, data.ambiguous_index] < 0.5]
            index.append(np.stack([np.full(len(t), k), t], 1))
        self.index = np.concatenate(index).astype(np.int64) if index else np.zeros((0, 2), np.int64)

    @property
    def session_names(self) -> list[str]:
        return self.data.session_names

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k, t = (int(v) for v in self.index[i])
        s = self.data.sessions[k]
        rows = np.arange(t - self.window + 1, t + 1)
        clipped = np.clip(rows, 0, None)
        features = np.concatenate([np.asarray(x[clipped], dtype=np.float32) for x in s.streams], axis=1)
        if self.pad == "zeros":
            features[rows < 0] = 0.0
        future = np.zeros((self.num_future, s.targets.shape[1]), dtype=np.float32)
        ahead = s.targets[t + 1 : t + 1 + self.num_future]
        future[: len(ahead)] = ahead
        return {
            "features": torch.from_numpy(features),
            "target": torch.from_numpy(s.targets[t].copy()),
            "future_target": torch.from_numpy(future),
            "session": torch.tensor(k, dtype=torch.int64),
            "frame": torch.tensor(t, dtype=torch.int64),
        }


# -- DataModules -------------------------------------------------------------------------------------


def holdout_sessions(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of ``names`` (at least one, never all) for validation, in their original order.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or fewer than 2 sessions to split.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if len(names) < 2:
        raise ValueError(f"{len(names)} training session(s): cannot hold some out for validation; give "
                         "val_sessions or more training sessions")
    count = min(len(names) - 1, max(1, round(fraction * len(names))))
    chosen = set(np.random.default_rng(seed).permutation(len(names))[:count].tolist())
    return [n for i, n in enumerate(names) if i in chosen]


class FeatureDataModule(BaseDataModule):
    """Windows over per-frame feature sessions for online action detection: what every feature DataModule shares.

    Splits (each a :class:`FeatureWindowDataset` of dict samples, see there):

    * ``train``: the training sessions less the validation ones; windows at every frame of ``train_frames``,
      without those whose current frame is ambiguous (OadTR drops them too; they carry no current-frame loss);
    * ``val``: ``val_sessions`` when given, else a seeded ``val_fraction`` of the training sessions. Models are
      selected on these: the released OadTR evaluates (and so selects) on the test set (REFERENCE §9.4);
    * ``test``: the test sessions; ``predict``: the split named by ``predict_split``.

    Which frames are evaluated (``frames``, for val / test / predict): ``"all"`` (default: every frame, the
    windows of the first ``window - 1`` frames padded at the start as ``pad`` says, which is what an online
    detector faces), ``"full_window"`` (only frames with a full window; the first ``window - 1`` are never
    evaluated) or ``"oadtr"`` (exactly the released code's frames). Ambiguous frames get a window (and a
    prediction) but the metric leaves them out.

    Class names, the background and the ambiguous index come from the data (a subclass reads them) unless
    given here. A subclass implements :meth:`read_split` for ``"train"`` and ``"test"``.

    Args:
        window: T, frames per window (the model's window; linked into the task).
        num_future: Q, anticipated frames per sample (the model's queries; linked into the task).
        frames: frame rule of val / test / predict: ``"all"``, ``"full_window"`` or ``"oadtr"``.
        train_frames: frame rule of the training windows.
        pad: start padding of windows reaching before frame 0, ``"replicate"`` (frame 0 repeated) or ``"zeros"``.
        val_sessions: validation session names, taken out of the training sessions; None: a seeded split.
        val_fraction: share of the training sessions held out when ``val_sessions`` is None.
        seed: seed of that split.
        predict_split: the split ``predict`` runs on (``"test"``, ``"val"`` or ``"train"``).
        class_names: replace the data's class names (one per target column).
        background_index: background column; None: the data's (column 0 or a class named "Background"); -1: none.
        ambiguous_index: ambiguous column; None: the data's (a data-info ``ignore_index`` or a class named
            "Ambiguous"); -1: none.
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    def __init__(self, window: int = 64, num_future: int = 8, frames: str = "all", train_frames: str = "all",
                 pad: str = "replicate", val_sessions: list[str] | None = None, val_fraction: float = 0.1,
                 seed: int = 0, predict_split: str = "test", class_names: list[str] | None = None,
                 background_index: int | None = None, ambiguous_index: int | None = None, batch_size: int = 128,
                 num_workers: int = 2, pin_memory: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        for name, value, choices in (("frames", frames, FRAME_RULES), ("train_frames", train_frames, FRAME_RULES),
                                     ("pad", pad, PAD_MODES),
                                     ("predict_split", predict_split, ("train", "val", "test"))):
            if value not in choices:
                raise ValueError(f"{type(self).__name__}: {name} must be one of {choices}, got {value!r}")
        if window < 1 or num_future < 1:
            raise ValueError(f"{type(self).__name__}: window and num_future must be >= 1, got {window}, {num_future}")
        self.window, self.num_future, self.pad = window, num_future, pad
        self.frames, self.train_frames = frames, train_frames
        self.val_sessions, self.val_fraction, self.seed = val_sessions, val_fraction, seed
        self.predict_split = predict_split
        self.class_names_arg = list(class_names) if class_names is not None else None
        self.background_arg, self.ambiguous_arg = background_index, ambiguous_index
        self._sets: dict[str, FeatureSet] = {}

    # -- reading ---------------------------------------------------------------------------------------
    def read_split(self, split: str) -> FeatureSet:
        """All sessions of ``"train"`` or ``"test"`` as the data defines them (a subclass reads its layout)."""
        raise NotImplementedError

    def _relabel(self, data: FeatureSet, source: str) -> FeatureSet:
        """Apply the class-name / background / ambiguous arguments to a set read from the data."""
        if self.class_names_arg is not None:
            if len(self.class_names_arg) != data.num_classes:
                raise ValueError(f"{source}: class_names has {len(self.class_names_arg)} names but the targets have "
                                 f"{data.num_classes} columns")
            data.class_names = list(self.class_names_arg)
        if self.background_arg is not None:
            data.background_index = None if self.background_arg == -1 else self.background_arg
        if self.ambiguous_arg is not None:
            data.ambiguous_index = None if self.ambiguous_arg == -1 else self.ambiguous_arg
        return check_feature_set(data, source)

    def feature_set(self, split: str) -> FeatureSet:
        """The sessions of ``split`` (``"train"``, ``"val"`` or ``"test"``), read on first use."""
        if split not in self._sets:
            if split == "test":
                self._sets[split] = self._relabel(self.read_split("test"), f"{type(self).__name__} test split")
            elif split in ("train", "val"):
                full = self._relabel(self.read_split("train"), f"{type(self).__name__} train split")
                names = full.session_names
                if self.val_sessions is not None:
                    unknown = [n for n in self.val_sessions if n not in names]
                    if unknown:
                        raise ValueError(f"{type(self).__name__}: val_sessions {unknown[:5]} are not training sessions")
                    val = list(self.val_sessions)
                else:
                    val = holdout_sessions(names, self.val_fraction, self.seed)
                train = [n for n in names if n not in set(val)]
                if not train:
                    raise ValueError(f"{type(self).__name__}: every training session is a validation session")
                self._sets["train"], self._sets["val"] = full.select(train), full.select(val)
            else:
                raise ValueError(f"unknown split {split!r}: expected train, val, test or predict")
        return self._sets[split]

    def build_dataset(self, split: str) -> FeatureWindowDataset:
        if split == "train":
            return FeatureWindowDataset(self.feature_set("train"), self.window, self.num_future, self.train_frames,
                                        self.pad, drop_ambiguous=True)
        return FeatureWindowDataset(self.feature_set(split), self.window, self.num_future, self.frames, self.pad)

    # -- what the task is sized by (linked by the CLI) ------------------------------------------------
    def _meta(self) -> FeatureSet:
        """The set the class list and sizes are read from: the training sessions (the test ones once read)."""
        return self._sets.get("train") or self._sets.get("test") or self.feature_set("train")

    @property
    def num_classes(self) -> int:
        """Target columns, background and ambiguous included."""
        return self._meta().num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._meta().class_names)

    @property
    def feature_dim(self) -> int:
        """Width of a frame's feature vector (the streams concatenated)."""
        return self._meta().feature_dim

    @property
    def background_index(self) -> int | None:
        return self._meta().background_index

    @property
    def ambiguous_index(self) -> int | None:
        return self._meta().ambiguous_index

    def frame_rule(self, split: str = "val") -> str:
        """Words for logs: which frames of ``split`` are evaluated and how windows are padded."""
        rule = self.train_frames if split == "train" else self.frames
        words = {"all": f"every frame (windows reaching before frame 0 padded: {self.pad})",
                 "full_window": f"frames with a full window of {self.window} (the first {self.window - 1} "
                                "of each session left out)",
                 "oadtr": "the released OadTR frames (full windows, the last num_future + 1 frames and ambiguous "
                          "current frames left out)"}
        return f"frames={rule!r}: {words[rule]}"


class LSTRFeatureDataModule(FeatureDataModule):
    """Online action detection on pre-extracted features in the LSTR / TeSTra layout (see :func:`read_lstr_features`).

    ``root/data_info.json`` names the train / test sessions, the class names and ``ignore_index`` (the
    ambiguous class); ``root/<visual_feature>/<session>.npy``, ``root/<motion_feature>/<session>.npy`` and
    ``root/<target_perframe>/<session>.npy`` hold the per-frame features and one-hot targets. Features are
    memory-mapped, so a split of any size opens at once. Everything else: :class:`FeatureDataModule`.

    Args:
        root: the data root (LSTR's ``DATA.DATA_ROOT``).
        data_info: the data-info json's name in ``root``.
        dataset: key in the json (``"THUMOS"``); None takes the only one.
        visual_feature, motion_feature: stream folders (None or "" leaves one out).
        target_perframe: target folder.
        mmap: memory-map the features (False reads them into memory).
    """

    def __init__(self, root: str, data_info: str = "data_info.json", dataset: str | None = None,
                 visual_feature: str | None = "rgb_kinetics_resnet50",
                 motion_feature: str | None = "flow_kinetics_bninception", target_perframe: str = "target_perframe",
                 mmap: bool = True, window: int = 64, num_future: int = 8, frames: str = "all",
                 train_frames: str = "all", pad: str = "replicate", val_sessions: list[str] | None = None,
                 val_fraction: float = 0.1, seed: int = 0, predict_split: str = "test",
                 class_names: list[str] | None = None, background_index: int | None = None,
                 ambiguous_index: int | None = None, batch_size: int = 128, num_workers: int = 2,
                 pin_memory: bool = False) -> None:
        super().__init__(window, num_future, frames, train_frames, pad, val_sessions, val_fraction, seed, predict_split,
                         class_names, background_index, ambiguous_index, batch_size, num_workers, pin_memory)
        self.root, self.data_info, self.dataset_key = root, data_info, dataset
        self.visual_feature, self.motion_feature, self.target_perframe, self.mmap = (
            visual_feature, motion_feature, target_perframe, mmap)

    def read_split(self, split: str) -> FeatureSet:
        return read_lstr_features(self.root, split, data_info=self.data_info, dataset=self.dataset_key,
                                  visual_feature=self.visual_feature, motion_feature=self.motion_feature,
                                  target_perframe=self.target_perframe, mmap=self.mmap)


class OadTRFeatureDataModule(FeatureDataModule):
    """Online action detection on OadTR's feature and annotation pickles (see :func:`read_oadtr_pickles`).

    ``root/data_info_new.json`` names the sessions and the classes (``class_index``); the ``train`` split
    reads the ``val`` pickles (THUMOS'14's validation videos are its training set), ``test`` the ``test``
    ones. The pickles are read whole into memory. Everything else: :class:`FeatureDataModule`.

    Args:
        root: the folder holding the json and the pickles.
        data_info: the data-info json's name.
        dataset: key in the json (``"THUMOS"``); None takes the only one.
        feature_file, anno_file: pickle names, ``{split}`` replaced by ``val`` (training) or ``test``
            (OadTR's other features: ``thumos_all_feature_{split}_tsn_v2_resize.pickle``,
            ``thumos_all_feature_{split}_V3.pickle``, ``thumos_all_feature_{split}.pickle``).
        streams: keys of each session's feature dict, concatenated in this order.
    """

    def __init__(self, root: str, data_info: str = "data_info_new.json", dataset: str | None = None,
                 feature_file: str = "thumos_all_feature_{split}_tsn_v2.pickle",
                 anno_file: str = "thumos_{split}_anno.pickle", streams: list[str] | None = None,
                 window: int = 64, num_future: int = 8, frames: str = "all", train_frames: str = "all",
                 pad: str = "replicate", val_sessions: list[str] | None = None, val_fraction: float = 0.1,
                 seed: int = 0, predict_split: str = "test", class_names: list[str] | None = None,
                 background_index: int | None = None, ambiguous_index: int | None = None, batch_size: int = 128,
                 num_workers: int = 2, pin_memory: bool = False) -> None:
        super().__init__(window, num_future, frames, train_frames, pad, val_sessions, val_fraction, seed, predict_split,
                         class_names, background_index, ambiguous_index, batch_size, num_workers, pin_memory)
        self.root, self.data_info, self.dataset_key = root, data_info, dataset
        self.feature_file, self.anno_file = feature_file, anno_file
        self.streams = list(streams) if streams is not None else ["rgb", "flow"]

    def read_split(self, split: str) -> FeatureSet:
        tag = {"train": "val", "test": "test"}[split]
        return read_oadtr_pickles(self.root, split, data_info=self.data_info, dataset=self.dataset_key,
                                  feature_file=self.feature_file.format(split=tag),
                                  anno_file=self.anno_file.format(split=tag), streams=self.streams)
