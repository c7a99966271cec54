"""FCOS target assignment against hand-computed cases (REFERENCE.md §3.2)."""

import math

import pytest
import torch

from lit_tasks.ops.assigners import pad_targets
from lit_tasks.ops.assigners import (INF, FCOS_REGRESS_RANGES, centerness_target, check_regress_ranges, fcos_targets,
                                     grid_points)

BG = 5  # background label = num_classes


def _assign(boxes, labels, sizes, strides, ranges, radius, valid=None):
    points, point_strides, levels = grid_points(sizes, strides)
    gt_boxes = torch.tensor([boxes], dtype=torch.float32)
    gt_labels = torch.tensor([labels])
    gt_valid = torch.ones_like(gt_labels, dtype=torch.bool) if valid is None else torch.tensor([valid])
    lab, ltrb = fcos_targets(points, point_strides, levels, gt_boxes, gt_labels, gt_valid, BG, radius, ranges)
    return points, lab[0], ltrb[0]


def test_grid_points_are_cell_centres():
    points, strides, levels = grid_points([(2, 3), (1, 1)], [8, 16])
    assert points[:3].tolist() == [[4, 4], [12, 4], [20, 4]]
    assert points[3:6].tolist() == [[4, 12], [12, 12], [20, 12]]
    assert points[6].tolist() == [8, 8]
    assert strides.tolist() == [8] * 6 + [16]
    assert levels.tolist() == [0] * 6 + [1]


def test_hand_built_two_levels_two_boxes():
    # Level 0: stride 8, points {4,12,20,28}^2, max distance <= 16; level 1: stride 16, points {8,24}^2, >= 16.
    ranges = ((-1.0, 16.0), (16.0, INF))
    box_a, box_b = [0, 0, 20, 20], [8, 8, 32, 32]
    for radius in (0.0, 1.5):  # centre regions here cover the whole boxes, so both must agree
        points, labels, ltrb = _assign([box_a, box_b], [1, 2], [(4, 4), (2, 2)], [8, 16], ranges, radius)
        got = {tuple(p): int(l) for p, l in zip(points.int().tolist(), labels) if l != BG}
        assert got == {(4, 4): 1, (12, 4): 1, (4, 12): 1, (12, 12): 1, (20, 20): 2, (24, 24): 2}, radius
        by_point = {tuple(p): t.tolist() for p, t in zip(points.int().tolist(), ltrb)}
        assert by_point[(4, 4)] == [4, 4, 16, 16]
        assert by_point[(12, 4)] == [12, 4, 8, 16]
        assert by_point[(12, 12)] == [12, 12, 8, 8]  # B also contains it but max dist 20 > 16 at level 0
        assert by_point[(20, 20)] == [12, 12, 12, 12]
        assert by_point[(24, 24)] == [16, 16, 8, 8]  # level 1: max distance 16 >= 16 (inclusive)
    ctr = centerness_target(torch.tensor([[4.0, 4, 16, 16], [12, 12, 8, 8], [12, 4, 8, 16], [16, 16, 8, 8]]))
    expected = [0.25, 2 / 3, math.sqrt(8 / 12 * 4 / 16), 0.5]
    assert torch.allclose(ctr, torch.tensor(expected), atol=1e-6)


def test_centre_sampling_restricts_positives():
    box = [[0, 0, 64, 64]]
    points, labels, _ = _assign(box, [0], [(8, 8)], [8], ((-1.0, INF),), 0.0)
    assert int((labels != BG).sum()) == 64  # every location inside the box
    points, labels, _ = _assign(box, [0], [(8, 8)], [8], ((-1.0, INF),), 1.5)
    # centre (32, 32) +- 1.5 * 8 = (20, 44): strictly inside only x, y in {28, 36}
    pos = sorted(tuple(p) for p, l in zip(points.int().tolist(), labels) if l != BG)
    assert pos == [(28, 28), (28, 36), (36, 28), (36, 36)]


def test_ambiguity_goes_to_smallest_box_and_ties_to_first():
    big, small = [0, 0, 40, 40], [0, 0, 24, 24]
    points, labels, ltrb = _assign([big, small], [3, 4], [(5, 5)], [8], ((-1.0, INF),), 0.0)
    idx = points.int().tolist().index([12, 12])
    assert int(labels[idx]) == 4 and ltrb[idx].tolist() == [12, 12, 12, 12]
    points, labels, _ = _assign([small, small], [3, 4], [(5, 5)], [8], ((-1.0, INF),), 0.0)
    assert int(labels[idx]) == 3


def test_invalid_and_crowd_boxes_assign_nothing():
    _, labels, _ = _assign([[0, 0, 40, 40]], [1], [(5, 5)], [8], ((-1.0, INF),), 0.0, valid=[False])
    assert bool((labels == BG).all())
    targets = [{"boxes": torch.tensor([[0.0, 0, 40, 40], [1, 1, 9, 9]]), "labels": torch.tensor([1, 2]),
                "iscrowd": torch.tensor([1, 0])}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    boxes, labels, valid = pad_targets(targets, torch.device("cpu"))
    assert boxes.shape == (2, 2, 4) and valid.tolist() == [[False, True], [False, False]]
    assert labels[0].tolist() == [1, 2]


def test_no_boxes_all_background():
    points, strides, levels = grid_points([(4, 4)], [8])
    labels, ltrb = fcos_targets(points, strides, levels, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
                                torch.zeros(2, 0, dtype=torch.bool), BG)
    assert labels.shape == (2, 16) and bool((labels == BG).all()) and ltrb.shape == (2, 16, 4)


def test_check_regress_ranges() -> None:
    check_regress_ranges(None)
    check_regress_ranges(FCOS_REGRESS_RANGES)
    with pytest.raises(ValueError, match=r"^DetectionTask: regress_ranges must be 5 \[lo, hi\] pairs"):
        check_regress_ranges([[0, 64], [64, 128]], what="DetectionTask")
    with pytest.raises(ValueError, match="^regress_ranges must increase from P3 to P7"):
        check_regress_ranges([[0, 64], [64, 128], [32, 256], [256, 512], [512, INF]])
