"""OKS between poses and OKS-NMS, against a NumPy port of mmpose's oks_iou / oks_nms and a hand-built case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_tasks.ops.oks import COCO_KEYPOINT_SIGMAS, oks_nms, pairwise_oks


def _mm_oks_iou(g, d, a_g, a_d, sigmas, vis_thr=None):
    """mmpose ``oks_iou`` (flat (K*3,) / (N, K*3) keypoints)."""
    variances = (sigmas * 2) ** 2
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    ious = np.zeros(len(d))
    for n in range(len(d)):
        xd, yd, vd = d[n, 0::3], d[n, 1::3], d[n, 2::3]
        e = ((xd - xg) ** 2 + (yd - yg) ** 2) / variances / ((a_g + a_d[n]) / 2 + np.spacing(1)) / 2
        if vis_thr is not None:
            e = e[list((vg > vis_thr) & (vd > vis_thr))]
        ious[n] = np.sum(np.exp(-e)) / len(e) if len(e) != 0 else 0.0
    return ious


def _mm_oks_nms(kpts, scores, areas, thr, sigmas, vis_thr=None):
    """mmpose ``oks_nms`` (with a stable descending order, to match ours on ties)."""
    kpts = kpts.reshape(len(kpts), -1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order) > 0:
        i = order[0]
        keep.append(i)
        ovr = _mm_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
        order = order[np.where(ovr <= thr)[0] + 1]
    return keep


def _hand_poses():
    """Two people (A at x ~ 100, C at x ~ 300), each with a near-duplicate pose; K = 17, area 10000."""
    rng = np.random.default_rng(0)
    base_a = np.stack([100 + rng.uniform(-40, 40, 17), 100 + rng.uniform(-80, 80, 17)], axis=1)
    base_c = base_a + [200, 0]
    poses = np.stack([
        base_a,                      # 0: A, score 0.9                -> kept
        base_a + 1.0,                # 1: A shifted 1 px, score 0.8   -> OKS ~0.99 with 0 -> suppressed
        base_c,                      # 2: C, score 0.7                -> kept
        base_c + [0.5, -0.5],        # 3: C, score 0.95               -> kept first; suppresses 2
        base_a + 25.0,               # 4: A shifted 25 px, score 0.6  -> OKS < 0.9 with 0 -> kept
    ])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6])
    kpt_scores = rng.uniform(0.1, 1.0, size=(5, 17, 1))
    return np.concatenate([poses, kpt_scores], axis=2), scores, np.full(5, 10000.0)


def test_pairwise_oks_matches_mmpose() -> None:
    kpts, _, areas = _hand_poses()
    areas = areas * np.array([1.0, 0.5, 2.0, 1.5, 0.7])
    sig = np.asarray(COCO_KEYPOINT_SIGMAS)
    for vis_thr in (None, 0.5):
        got = pairwise_oks(torch.tensor(kpts), torch.tensor(kpts), torch.tensor(areas), torch.tensor(areas),
                           vis_threshold=vis_thr).numpy()
        flat = kpts.reshape(5, -1)
        want = np.stack([_mm_oks_iou(flat[i], flat, areas[i], areas, sig, vis_thr) for i in range(5)])
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    assert np.allclose(np.diag(got), 1.0)


def test_oks_nms_hand_case() -> None:
    kpts, scores, areas = _hand_poses()
    keep = oks_nms(torch.tensor(kpts), torch.tensor(scores), torch.tensor(areas), threshold=0.9)
    assert keep.tolist() == [3, 0, 4]
    assert keep.tolist() == [int(i) for i in _mm_oks_nms(kpts, scores, areas, 0.9, np.asarray(COCO_KEYPOINT_SIGMAS))]
    # OKS(0, 4) is below 0.9 but above 0.05: a low threshold suppresses the 25-px neighbour too.
    keep_low = oks_nms(torch.tensor(kpts), torch.tensor(scores), torch.tensor(areas), threshold=0.05)
    assert keep_low.tolist() == [3, 0]


def test_oks_nms_random_matches_mmpose() -> None:
    rng = np.random.default_rng(1)
    k = 5
    sig = np.linspace(0.03, 0.1, k)
    centres = rng.uniform(0, 300, size=(4, 1, 2))
    kpts = (centres + rng.uniform(-30, 30, size=(4, k, 2)))[rng.integers(0, 4, 40)] + rng.normal(0, 3, (40, k, 2))
    kpts = np.concatenate([kpts, rng.random((40, k, 1))], axis=2)
    scores = rng.random(40)
    areas = rng.uniform(2000, 5000, 40)
    for thr, vis in ((0.9, None), (0.5, None), (0.7, 0.3)):
        keep = oks_nms(torch.tensor(kpts), torch.tensor(scores), torch.tensor(areas), thr, sigmas=sig,
                       vis_threshold=vis)
        assert keep.tolist() == [int(i) for i in _mm_oks_nms(kpts, scores, areas, thr, sig, vis)]
        assert 4 <= len(keep) < 40  # something was suppressed, and each of the 4 people survives


def test_oks_nms_empty_and_errors() -> None:
    assert oks_nms(torch.zeros(0, 17, 3), torch.zeros(0), torch.zeros(0)).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        oks_nms(torch.zeros(2, 17, 3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="number of keypoints"):
        pairwise_oks(torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), torch.ones(2), torch.ones(2))
