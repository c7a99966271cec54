"""Hungarian matcher (lit_tasks/ops/matcher.py) against scipy on the reference's full cost matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from lit_tasks.ops.matcher import HungarianMatcher, hungarian_match, matching_cost


def _random_boxes_cxcywh(g: torch.Generator, n: int) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=g) * 0.8 + 0.1
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.02
    return torch.cat([centre, size], dim=1)


def _problem(sizes: list[int], num_queries: int, num_classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sizes), num_queries, num_classes + 1, generator=g) * 3
    boxes = _random_boxes_cxcywh(g, len(sizes) * num_queries).view(len(sizes), num_queries, 4)
    labels = [torch.randint(0, num_classes, (n,), generator=g) for n in sizes]
    tgt_boxes = [_random_boxes_cxcywh(g, n) for n in sizes]
    return logits, boxes, labels, tgt_boxes


def _reference_full_cost(logits, boxes, labels, tgt_boxes, w_class=1.0, w_bbox=5.0, w_giou=2.0) -> np.ndarray:
    """The reference's way (detr models/matcher.py): one [B*Q, sum T] matrix, here in float64 with torchvision."""
    prob = logits.double().flatten(0, 1).softmax(-1)
    out_bbox = boxes.double().flatten(0, 1)
    tgt_ids = torch.cat(labels)
    tgt_bbox = torch.cat(tgt_boxes).double()
    cost_class = -prob[:, tgt_ids]
    cost_bbox = (out_bbox[:, None, :] - tgt_bbox[None, :, :]).abs().sum(-1)
    cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy"))
    cost = w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou
    return cost.view(logits.shape[0], logits.shape[1], -1).numpy()


def _check_optimal(indices, logits, boxes, labels, tgt_boxes, **weights) -> None:
    full = _reference_full_cost(logits, boxes, labels, tgt_boxes, **weights)
    sizes = [len(t) for t in labels]
    offsets = np.cumsum([0] + sizes)
    num_queries = logits.shape[1]
    for i, (rows, cols) in enumerate(indices):
        block = full[i, :, offsets[i]: offsets[i + 1]]
        assert len(rows) == len(cols) == min(num_queries, sizes[i])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if sizes[i] == 0:
            continue
        best_rows, best_cols = linear_sum_assignment(block)
        optimum = block[best_rows, best_cols].sum()
        ours = block[rows.numpy(), cols.numpy()].sum()
        # fp32 costs of magnitude <= ~25 summed over <= 12 pairs: a few 1e-5 of rounding at most.
        assert ours == pytest.approx(optimum, abs=1e-4)


def test_matching_cost_matches_reference_formula() -> None:
    logits, boxes, labels, tgt_boxes = _problem([6], num_queries=9)
    ours = matching_cost(logits.softmax(-1), boxes, labels[0][None], tgt_boxes[0][None], 1.0, 5.0, 2.0)
    ref = _reference_full_cost(logits, boxes, labels, tgt_boxes)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("weights", [dict(w_class=1.0, w_bbox=5.0, w_giou=2.0), dict(w_class=2.0, w_bbox=1.0, w_giou=0.5)])
def test_assignment_cost_is_scipy_optimum_on_full_matrix(weights) -> None:
    sizes = [3, 0, 12, 1]  # a batch mixing images without objects and with many
    logits, boxes, labels, tgt_boxes = _problem(sizes, num_queries=15, seed=1)
    indices = hungarian_match(logits, boxes, labels, tgt_boxes, weights["w_class"], weights["w_bbox"], weights["w_giou"])
    assert len(indices) == len(sizes)
    _check_optimal(indices, logits, boxes, labels, tgt_boxes, **weights)


def test_the_matcher_is_hungarian_match_with_its_costs() -> None:
    logits, boxes, labels, tgt_boxes = _problem([3, 0, 5], num_queries=7, seed=4)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=1.0, cost_giou=0.5)
    for ours, ref in zip(matcher(logits, boxes, labels, tgt_boxes),
                         hungarian_match(logits, boxes, labels, tgt_boxes, 2.0, 1.0, 0.5)):
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    with pytest.raises(TypeError):
        HungarianMatcher(2.0)  # keyword-only: three costs must not be confused by position


def test_more_targets_than_queries() -> None:
    logits, boxes, labels, tgt_boxes = _problem([7, 2], num_queries=4, seed=2)
    indices = hungarian_match(logits, boxes, labels, tgt_boxes)
    assert [len(r) for r, _ in indices] == [4, 2]
    _check_optimal(indices, logits, boxes, labels, tgt_boxes)


def test_no_targets_anywhere() -> None:
    logits, boxes, labels, tgt_boxes = _problem([0, 0], num_queries=5)
    indices = hungarian_match(logits, boxes, labels, tgt_boxes)
    assert [(len(r), len(c)) for r, c in indices] == [(0, 0), (0, 0)]


def test_obvious_assignment() -> None:
    """Each target has exactly one prediction on top of it with the right class: the matching must find them."""
    tgt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.05, 0.4]])
    boxes = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.05, 0.4], [0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]])
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([2, 0, 1])
    logits[0, [2, 3, 1], labels] = 5.0
    rows, cols = hungarian_match(logits, boxes[None], [labels], [tgt])[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {1: 2, 2: 0, 3: 1}


def test_fp32_under_autocast_and_non_finite_predictions() -> None:
    logits, boxes, labels, tgt_boxes = _problem([4, 2], num_queries=6, seed=3)
    low_logits, low_boxes = logits.bfloat16(), boxes.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = hungarian_match(low_logits, low_boxes, labels, tgt_boxes)
    # Same problem given in fp32 (the bf16 values, upcast): the costs must have been computed in fp32.
    _check_optimal(indices, low_logits.float(), low_boxes.float(), labels, tgt_boxes)

    boxes_nan = boxes.clone()
    boxes_nan[0, :3] = float("nan")
    rows, _ = hungarian_match(logits, boxes_nan, labels, tgt_boxes)[0]
    assert len(rows) == 4 and set(rows.tolist()) >= {3, 4, 5}  # finite predictions are preferred


def test_wrong_batch_size_is_an_error() -> None:
    logits, boxes, labels, tgt_boxes = _problem([1, 2], num_queries=3)
    with pytest.raises(ValueError, match="2 images of predictions but 1 label"):
        hungarian_match(logits, boxes, labels[:1], tgt_boxes[:1])
