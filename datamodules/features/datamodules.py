"""The feature DataModules: windows over per-frame feature sessions for online action detection.

:class:`FeatureDataModule` holds what they share (splits, validation hold-out, frame rules, the sizes the CLI
links); :class:`LSTRFeatureDataModule` and :class:`OadTRFeatureDataModule` read the two on-disk layouts
(:mod:`datamodules.features.layouts`), the synthetic streams' and the TFRecord one subclass it too
(``datamodules.synthetic.streams``, ``datamodules.features.tfrecord``). Samples: :mod:`datamodules.features.samples`.
"""

from __future__ import annotations

from datamodules.base import BaseDataModule
from datamodules.features.layouts import read_lstr_features, read_oadtr_pickles
from datamodules.features.samples import (FRAME_RULES, PAD_MODES, FeatureSet, FeatureWindowDataset, check_feature_set,
                                          holdout_sessions)


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

    def __init__(self, *, window: int = 64, num_future: int = 8, frames: str = "all", train_frames: str = "all",
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
            return FeatureWindowDataset(self.feature_set("train"), window=self.window, num_future=self.num_future,
                                        frames=self.train_frames, pad=self.pad, drop_ambiguous=True)
        return FeatureWindowDataset(self.feature_set(split), window=self.window, num_future=self.num_future,
                                    frames=self.frames, pad=self.pad)

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
        super().__init__(window=window, num_future=num_future, frames=frames, train_frames=train_frames, pad=pad,
                         val_sessions=val_sessions, val_fraction=val_fraction, seed=seed, predict_split=predict_split,
                         class_names=class_names, background_index=background_index, ambiguous_index=ambiguous_index,
                         batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
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
        super().__init__(window=window, num_future=num_future, frames=frames, train_frames=train_frames, pad=pad,
                         val_sessions=val_sessions, val_fraction=val_fraction, seed=seed, predict_split=predict_split,
                         class_names=class_names, background_index=background_index, ambiguous_index=ambiguous_index,
                         batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.root, self.data_info, self.dataset_key = root, data_info, dataset
        self.feature_file, self.anno_file = feature_file, anno_file
        self.streams = list(streams) if streams is not None else ["rgb", "flow"]

    def read_split(self, split: str) -> FeatureSet:
        tag = {"train": "val", "test": "test"}[split]
        # The ambiguous column is needed while reading: OadTR's argmax rule is applied there (see
        # datamodules.features.layouts).
        return read_oadtr_pickles(self.root, split, data_info=self.data_info, dataset=self.dataset_key,
                                  feature_file=self.feature_file.format(split=tag),
                                  anno_file=self.anno_file.format(split=tag), streams=self.streams,
                                  ambiguous_index=self.ambiguous_arg)
