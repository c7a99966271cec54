"""Synthetic per-frame feature streams for online action detection: no download, and time matters.

Each session is background with action segments of varying duration, some followed by a short
"ambiguous" stretch (as THUMOS marks unclear boundaries). An action's frames follow a class-specific
temporal pattern: the segment is cut into ``phases`` equal parts and each part shows one prototype vector
(plus Gaussian noise). Actions come in pairs that share their prototypes in REVERSED order (class 1 shows
P1 then P2, class 2 shows P2 then P1), so one frame alone cannot tell the two apart (about chance within
a pair) while the frames before it can: a temporal model such as OadTR beats a per-frame classifier.

Prototypes come from ``pattern_seed`` and everything else (layout, noise) from ``seed``, so training and
held-out streams with different seeds show the same classes. The output is a
``datamodules.features.samples.FeatureSet``, the structure the feature readers return;
:class:`SyntheticStreamsDataModule` serves train / validation / held-out test streams from three seeds.
"""

from __future__ import annotations

import numpy as np

from datamodules.features.datamodules import FeatureDataModule
from datamodules.features.samples import FeatureSession, FeatureSet, check_feature_set


def class_patterns(num_actions: int, feature_dim: int, phases: int = 2, pattern_seed: int = 0,
                   scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Prototype sequences of the actions and the background prototype.

    Returns:
        ``(patterns (num_actions, phases, D), background (D,))`` float32: action ``2i`` and ``2i + 1``
        (0-based) share prototypes in reversed phase order; with an odd count the last action has its own.
    """
    rng = np.random.default_rng(pattern_seed)
    patterns = np.zeros((num_actions, phases, feature_dim), np.float32)
    for a in range(0, num_actions, 2):
        protos = rng.normal(0.0, scale, (phases, feature_dim)).astype(np.float32)
        patterns[a] = protos
        if a + 1 < num_actions:
            patterns[a + 1] = protos[::-1]
    background = rng.normal(0.0, scale, feature_dim).astype(np.float32)
    return patterns, background


def make_feature_streams(num_sessions: int = 8, *, num_actions: int = 4, feature_dim: int = 16, min_frames: int = 80,
                         max_frames: int = 160, min_action: int = 8, max_action: int = 24, min_gap: int = 4,
                         max_gap: int = 16, ambiguous_prob: float = 0.3, max_ambiguous: int = 3, noise: float = 0.5,
                         phases: int = 2, seed: int = 0, pattern_seed: int = 0) -> FeatureSet:
    """Generate ``num_sessions`` labelled feature streams, deterministically from ``seed``.

    Classes: ``["Background", "Action1", ..., "Action<num_actions>", "Ambiguous"]`` (background 0, ambiguous
    last). A session of ``T ~ U[min_frames, max_frames]`` frames starts with a background gap
    ``U[min_gap, max_gap]``, then alternates actions (``U[min_action, max_action]`` frames, a uniformly drawn
    class; the last one may be cut by the end of the session) and gaps; after an action, with probability
    ``ambiguous_prob``, ``1..max_ambiguous`` frames are ambiguous (features halfway between the action's last
    prototype and the background).

    Returns:
        A checked ``FeatureSet`` with one stream ``(T, feature_dim)`` float32 and one-hot float32 targets per
        session, named ``synthetic<seed>_<index>``.
    """
    if num_sessions < 1 or num_actions < 1 or phases < 1:
        raise ValueError("make_feature_streams: num_sessions, num_actions and phases must be >= 1")
    if not (1 <= min_frames <= max_frames and 1 <= min_action <= max_action and 0 <= min_gap <= max_gap):
        raise ValueError("make_feature_streams: need 1 <= min <= max for frames and actions, 0 <= min_gap <= max_gap")
    patterns, background = class_patterns(num_actions, feature_dim, phases=phases, pattern_seed=pattern_seed)
    rng = np.random.default_rng(seed)
    ambiguous = num_actions + 1
    names = ["Background"] + [f"Action{a + 1}" for a in range(num_actions)] + ["Ambiguous"]
    sessions = []
    for i in range(num_sessions):
        length = int(rng.integers(min_frames, max_frames + 1))
        labels = np.zeros(length, np.int64)
        means = np.repeat(background[None], length, 0)
        t = int(rng.integers(min_gap, max_gap + 1))
        while t < length:
            action = int(rng.integers(num_actions))
            duration = int(rng.integers(min_action, max_action + 1))
            end = min(length, t + duration)  # a segment cut by the end of the session keeps its phase lengths
            phase = (np.arange(end - t) * phases) // duration
            labels[t:end] = action + 1
            means[t:end] = patterns[action, phase]
            t = end
            if t < length and rng.random() < ambiguous_prob:
                stop = min(length, t + int(rng.integers(1, max_ambiguous + 1)))
                labels[t:stop] = ambiguous
                means[t:stop] = 0.5 * (patterns[action, -1] + background)
                t = stop
            t += int(rng.integers(min_gap, max_gap + 1))
        features = (means + rng.normal(0.0, noise, means.shape)).astype(np.float32)
        targets = np.eye(num_actions + 2, dtype=np.float32)[labels]
        sessions.append(FeatureSession(f"synthetic{seed}_{i:04d}", [features], targets))
    return check_feature_set(FeatureSet(sessions, names, 0, ambiguous), f"synthetic streams (seed {seed})")


class SyntheticStreamsDataModule(FeatureDataModule):
    """Online action detection on generated feature streams (:func:`make_feature_streams`): no download.

    Three disjoint seed streams: ``num_train`` training sessions (seed ``3 * seed``), ``num_val`` validation
    sessions (``3 * seed + 1``, model selection) and ``num_test`` held-out test sessions (``3 * seed + 2``),
    all showing the same classes (one ``pattern_seed``). Classes: Background, ``Action1..N``, Ambiguous.
    Windows and frame rules: :class:`~datamodules.features.datamodules.FeatureDataModule`.

    Args:
        num_train, num_val, num_test: sessions per split.
        num_actions, feature_dim, min_frames, max_frames, min_action, max_action, noise, phases,
            ambiguous_prob, pattern_seed: as :func:`make_feature_streams`.
        seed: picks the three seed streams.
    """

    def __init__(self, num_train: int = 64, num_val: int = 16, num_test: int = 16, num_actions: int = 4,
                 feature_dim: int = 16, min_frames: int = 80, max_frames: int = 160, min_action: int = 8,
                 max_action: int = 24, noise: float = 0.5, phases: int = 2, ambiguous_prob: float = 0.3,
                 pattern_seed: int = 0, seed: int = 0, window: int = 16, num_future: int = 4, frames: str = "all",
                 train_frames: str = "all", pad: str = "replicate", predict_split: str = "test",
                 batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(window=window, num_future=num_future, frames=frames, train_frames=train_frames, pad=pad,
                         seed=seed, predict_split=predict_split, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        if seed < 0:
            raise ValueError(f"SyntheticStreamsDataModule: seed must be >= 0, got {seed}")
        self.counts = {"train": num_train, "val": num_val, "test": num_test}
        self.stream_args = dict(num_actions=num_actions, feature_dim=feature_dim, min_frames=min_frames,
                                max_frames=max_frames, min_action=min_action, max_action=max_action, noise=noise,
                                phases=phases, ambiguous_prob=ambiguous_prob, pattern_seed=pattern_seed)

    def feature_set(self, split: str) -> FeatureSet:
        if split not in self._sets:
            if split not in self.counts:
                raise ValueError(f"unknown split {split!r}: expected train, val, test or predict")
            offset = ("train", "val", "test").index(split)
            self._sets[split] = make_feature_streams(self.counts[split], seed=3 * self.seed + offset,
                                                     **self.stream_args)
        return self._sets[split]
