"""The dense-detector post-processing tail (lit_tasks/ops/dense_postprocess.py) on hand-built cases: a location whose
point lies outside the image never yields a detection and takes no place of a level's top-k budget, in the tail and
through FCOS's and VFNet's post-processors."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from lit_tasks.models.detection.fcos import FCOSOutput, FCOSPostprocess
from lit_tasks.models.detection.vfnet import VFNetOutput, VFNetPostprocess
from lit_tasks.ops.assigners import grid_points
from lit_tasks.ops.box_ops import distance2bbox
from lit_tasks.ops.dense_postprocess import dense_detections, points_inside, topk_pairs

# Level 0: 2 x 2 locations at stride 8, points (4, 4) (12, 4) (4, 12) (12, 12); level 1: one at stride 16, (8, 8).
LEVEL_SIZES = [(2, 2), (1, 1)]
POINTS, STRIDES, LEVELS = grid_points(LEVEL_SIZES, [8, 16])
IMAGE = (10, 10)  # (h, w): only (4, 4) of level 0 and (8, 8) of level 1 lie inside
# The outside locations score highest: were they candidates, they would fill a budget of 1 per level.
PROB = torch.tensor([[0.5, 0.1], [0.9, 0.2], [0.8, 0.3], [0.95, 0.1], [0.4, 0.6]])
LTRB = torch.tensor([[2.0, 2.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0],
                     [4.0, 4.0, 20.0, 20.0]])


def test_points_inside_is_strict_at_the_far_border() -> None:
    points = torch.tensor([[0.0, 0.0], [9.5, 9.5], [10.0, 5.0], [5.0, 10.0]])
    assert points_inside(points, (10, 10)).tolist() == [True, True, False, False]


@pytest.mark.parametrize("top_k", ["pairs", "locations"])
def test_outside_locations_never_detect_and_take_no_budget(top_k: str) -> None:
    det = dense_detections(PROB, PROB > 0.05, LTRB, POINTS, [4, 1], IMAGE, pre_nms_top_k=1, nms_threshold=1.0,
                           max_detections=100, top_k=top_k)
    # Budget 1 per level, spent inside: "pairs" takes the best pair of level 0's location 0 and of level 1's location
    # 4; "locations" takes those two locations with every candidate pair of theirs.
    want = [(0.5, 0, 0), (0.6, 1, 4)] + ([(0.1, 1, 0), (0.4, 0, 4)] if top_k == "locations" else [])
    want.sort(reverse=True)
    assert det["scores"].tolist() == pytest.approx([s for s, _, _ in want])
    assert det["labels"].tolist() == [c for _, c, _ in want]
    boxes = clip_boxes_to_image(distance2bbox(POINTS, LTRB), IMAGE)
    torch.testing.assert_close(det["boxes"], boxes[[loc for _, _, loc in want]])


def test_outside_locations_never_detect_with_any_budget() -> None:
    for top_k in ("pairs", "locations"):
        det = dense_detections(PROB, PROB > 0.0, LTRB, POINTS, [4, 1], IMAGE, pre_nms_top_k=100, nms_threshold=1.0,
                               max_detections=100, top_k=top_k)
        boxes = clip_boxes_to_image(distance2bbox(POINTS, LTRB), IMAGE)
        got = sorted((c, b) for c, b in zip(det["labels"].tolist(), det["boxes"].tolist()))
        assert got == sorted((c, boxes[loc].tolist()) for loc in (0, 4) for c in (0, 1)), top_k  # 2 inside x 2 classes


def test_an_image_filling_its_grid_is_the_plain_reference() -> None:
    """Everything inside: the tail is threshold, top-k over pairs, decode, clip, batched NMS, keep the best."""
    g = torch.Generator().manual_seed(0)
    rank = torch.rand(5, 3, generator=g)
    ltrb = 1 + 20 * torch.rand(5, 4, generator=g)
    det = dense_detections(rank, rank > 0.3, ltrb, POINTS, [4, 1], (20, 20), pre_nms_top_k=3, nms_threshold=0.5,
                           max_detections=4, score_transform=torch.sqrt)
    boxes, scores, labels = [], [], []
    for level in (slice(0, 4), slice(4, 5)):
        r = torch.where(rank[level] > 0.3, rank[level], -1.0).flatten()
        top, index = r.topk(min(3, r.numel()))
        index = index[top >= 0]
        loc, cls = index // 3 + level.start, index % 3
        boxes.append(clip_boxes_to_image(distance2bbox(POINTS[loc], ltrb[loc]), (20, 20)))
        scores.append(rank[loc, cls].sqrt())
        labels.append(cls)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(boxes, scores, labels, 0.5)[:4]
    assert len(keep) >= 3
    torch.testing.assert_close(det["boxes"], boxes[keep], rtol=0, atol=0)
    torch.testing.assert_close(det["scores"], scores[keep], rtol=0, atol=0)
    assert det["labels"].tolist() == labels[keep].tolist()


@pytest.mark.parametrize("threshold", [0.0, 0.9, 0.999, 1.0])
def test_topk_pairs_is_the_top_k_of_the_masked_scores(threshold: float) -> None:
    """The candidates' top-k equals the earlier formula, the top-k of every pair with non-candidates at -inf, pair for
    pair and in order (continuous random scores: no ties); thresholds leave more, fewer and no pairs than k."""
    g = torch.Generator().manual_seed(0)
    rank = torch.rand(300, 80, generator=g)
    candidate = rank > threshold
    flat = rank.masked_fill(~candidate, float("-inf")).flatten()
    top, index = flat.topk(1000)
    index = index[top > float("-inf")]
    location, label = topk_pairs(rank, candidate, 1000)
    assert location.tolist() == (index // 80).tolist()
    assert label.tolist() == (index % 80).tolist()
    assert len(location) == min(1000, int(candidate.sum()))


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p)[None]


def test_fcos_postprocess_drops_outside_locations_before_its_top_k() -> None:
    out = FCOSOutput(_logit(PROB), (LTRB / STRIDES[:, None])[None], _logit(torch.full((5,), 0.5)), POINTS, STRIDES,
                     LEVELS)
    (det,) = FCOSPostprocess(score_threshold=0.05, pre_nms_top_k=1, nms_threshold=1.0)(out, [IMAGE])
    assert sorted(det["scores"].tolist()) == pytest.approx(sorted([(0.5 * 0.5) ** 0.5, (0.6 * 0.5) ** 0.5]))


def test_vfnet_postprocess_drops_outside_locations_before_its_top_k() -> None:
    out = VFNetOutput(_logit(PROB), LTRB[None], LTRB[None], POINTS, STRIDES, LEVELS, LEVEL_SIZES, [IMAGE])
    (det,) = VFNetPostprocess(score_threshold=0.05, pre_nms_top_k=1, nms_threshold=1.0)(out, [IMAGE])
    assert sorted(det["scores"].tolist()) == pytest.approx([0.1, 0.4, 0.5, 0.6])
