"""Synthetic feature streams (datamodules.synthetic.streams): determinism, label structure, temporal patterns."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.features.samples import FeatureSet
from datamodules.synthetic.streams import class_patterns, make_feature_streams


def runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """(label, start, end) of each run of equal labels."""
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(labels)]])
    return [(int(labels[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def test_deterministic_from_seed() -> None:
    a = make_feature_streams(num_sessions=3, seed=5)
    b = make_feature_streams(num_sessions=3, seed=5)
    c = make_feature_streams(num_sessions=3, seed=6)
    assert isinstance(a, FeatureSet) and a.session_names == ["synthetic5_0000", "synthetic5_0001", "synthetic5_0002"]
    for sa, sb in zip(a.sessions, b.sessions):
        np.testing.assert_array_equal(sa.features, sb.features)
        np.testing.assert_array_equal(sa.targets, sb.targets)
    assert any(sa.num_frames != sc.num_frames or not np.array_equal(sa.labels, sc.labels)
               for sa, sc in zip(a.sessions, c.sessions))
    # Patterns depend on pattern_seed only: held-out streams show the same classes.
    p5, bg5 = class_patterns(4, 16, pattern_seed=0)
    np.testing.assert_array_equal(p5[1], p5[0][::-1])  # a pair: the same prototypes in reversed order
    assert not np.allclose(p5[2], p5[0])


def test_label_structure() -> None:
    kw = dict(num_sessions=12, num_actions=5, min_frames=60, max_frames=120, min_action=6, max_action=20,
              min_gap=3, max_gap=10, ambiguous_prob=0.5, max_ambiguous=3)
    data = make_feature_streams(seed=1, **kw)
    assert data.class_names == ["Background", "Action1", "Action2", "Action3", "Action4", "Action5", "Ambiguous"]
    assert data.background_index == 0 and data.ambiguous_index == 6 and data.stream_dims == [16]
    seen, n_ambiguous = set(), 0
    for s in data.sessions:
        assert 60 <= s.num_frames <= 120
        assert s.targets.dtype == np.float32 and (s.targets.sum(1) == 1).all() and set(np.unique(s.targets)) <= {0, 1}
        r = runs(s.labels)
        assert r[0][0] == 0 and 3 <= r[0][2] <= 10  # starts with a background gap
        for k, (label, start, end) in enumerate(r):
            at_end = end == s.num_frames
            if 1 <= label <= 5:
                seen.add(label)
                assert end - start <= 20 and (at_end or end - start >= 6)
            elif label == 6:
                n_ambiguous += 1
                assert 1 <= end - start <= 3 and 1 <= r[k - 1][0] <= 5  # right after an action
            else:
                assert k == 0 or at_end or end - start >= 3
    assert seen == {1, 2, 3, 4, 5} and n_ambiguous > 3


def test_features_follow_the_class_patterns() -> None:
    data = make_feature_streams(num_sessions=30, num_actions=2, feature_dim=8, noise=0.5, ambiguous_prob=0.0,
                                min_action=10, max_action=10, seed=2)
    patterns, background = class_patterns(2, 8)
    halves = {(a, h): [] for a in (1, 2) for h in (0, 1)}
    bg = []
    for s in data.sessions:
        f = s.features
        for label, start, end in runs(s.labels):
            if label == 0:
                bg.append(f[start:end])
            elif end - start == 10:
                halves[(label, 0)].append(f[start : start + 5])
                halves[(label, 1)].append(f[start + 5 : end])
    for (a, h), chunks in halves.items():
        mean = np.concatenate(chunks).mean(0)
        n = sum(len(c) for c in chunks)
        assert np.abs(mean - patterns[a - 1, h]).max() < 5 * 0.5 / np.sqrt(n)
    np.testing.assert_allclose(np.concatenate(bg).mean(0), background, atol=0.1)


def test_history_separates_what_a_single_frame_cannot() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures

    # Quadratic logistic regression: within a pair the class is an XOR of "what is seen now" and "what was
    # seen before", which a linear model on [now, past] cannot express.
    def fit_score(x_tr, y_tr, x_te, y_te) -> float:
        model = make_pipeline(PolynomialFeatures(2), LogisticRegression(max_iter=2000))
        return model.fit(x_tr, y_tr).score(x_te, y_te)

    def frames(seed: int):
        data = make_feature_streams(num_sessions=20, num_actions=2, feature_dim=8, noise=0.8, seed=seed)
        now, past, y = [], [], []
        for s in data.sessions:
            f = s.features
            for t in np.flatnonzero((s.labels == 1) | (s.labels == 2)):
                now.append(f[t])
                past.append(f[max(0, t - 8) : t + 1].mean(0))
                y.append(s.labels[t])
        return np.array(now), np.array(past), np.array(y)

    now_tr, past_tr, y_tr = frames(10)
    now_te, past_te, y_te = frames(11)
    per_frame = fit_score(now_tr, y_tr, now_te, y_te)
    temporal = fit_score(np.concatenate([now_tr, past_tr], 1), y_tr, np.concatenate([now_te, past_te], 1), y_te)
    assert per_frame < 0.65 and temporal > 0.85, (per_frame, temporal)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        make_feature_streams(num_actions=0)
    with pytest.raises(ValueError, match="min <= max"):
        make_feature_streams(min_frames=50, max_frames=40)
