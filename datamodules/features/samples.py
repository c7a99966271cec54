"""The feature family's sample contract: sessions of per-frame features, their checks, and the windows cut from them.

A :class:`FeatureSet` holds the sessions (videos) of one split, each a :class:`FeatureSession` with its feature
streams and per-frame targets, plus the class names and the background / "ambiguous" class indices; every reader
(:mod:`datamodules.features.layouts`, :mod:`datamodules.features.tfrecord`) and the synthetic generator
(:mod:`datamodules.synthetic.streams`) returns one, checked by :func:`check_feature_set`. Streams are concatenated
(rgb then flow) into one feature vector per frame, as OadTR does. :class:`FeatureWindowDataset` cuts the windows a
windowed model sees, at stride 1; :func:`holdout_sessions` draws the validation sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

PAD_MODES = ("replicate", "zeros")
FRAME_RULES = ("all", "full_window", "oadtr")


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

    def __init__(self, data: FeatureSet, *, window: int = 64, num_future: int = 8, frames: str = "all",
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
