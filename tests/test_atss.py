"""ATSS assignment (REFERENCE.md §4.2): against a loop-based port of mmdet's ATSSAssigner and hand-built cases."""

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from lit_tasks.ops.assigners import atss_targets, grid_points, square_anchors

NUM_CLASSES = 7


def anchors_for(sizes, strides):
    """VFNet's ATSS anchors: one 8*stride square per location, centred at (x*s, y*s) (center_offset 0)."""
    points, point_strides, levels = grid_points(sizes, strides)
    points = points - (point_strides // 2)[:, None]
    return points, square_anchors(points, point_strides), [h * w for h, w in sizes]


def mmdet_atss_loop(anchors, num_level_anchors, gt_boxes, topk=9):
    """Direct port of mmdet 2.x ``ATSSAssigner.assign`` for one image, with per-box and per-anchor loops.

    Returns assigned_gt_inds (P,): 0 = background, i + 1 = box i (mmdet's convention).
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.zeros(num_anchors, dtype=torch.long)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    overlaps = tv_box_iou(anchors, gt_boxes)  # (P, G)
    gt_points = torch.stack(((gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2), 1)
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    distances = (torch.stack((cx, cy), 1)[:, None, :] - gt_points[None]).pow(2).sum(-1).sqrt()

    candidate_idxs, start = [], 0
    for count in num_level_anchors:
        k = min(topk, count)
        _, idx = distances[start : start + count].topk(k, dim=0, largest=False)
        candidate_idxs.append(idx + start)
        start += count
    candidate_idxs = torch.cat(candidate_idxs, dim=0)  # (K, G)

    best_iou = torch.full((num_anchors,), -1e8)
    for g in range(num_gt):
        cand = candidate_idxs[:, g]
        ious = overlaps[cand, g]
        threshold = ious.mean() + ious.std()  # torch.std: unbiased
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        for j, a in enumerate(cand.tolist()):
            inside = min(cx[a] - x1, cy[a] - y1, x2 - cx[a], y2 - cy[a]) > 0.01
            if ious[j] >= threshold and inside and overlaps[a, g] > best_iou[a]:  # strict: first box wins ties
                best_iou[a] = overlaps[a, g]
                assigned[a] = g + 1
    return assigned


def random_boxes(g, n, h, w):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 6.0, h - 6.0])
    wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    return torch.cat((xy, torch.minimum(xy + wh, torch.tensor([w - 0.5, h - 0.5]))), 1)


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_port_of_mmdet(seed):
    g = torch.Generator().manual_seed(seed)
    strides = [8, 16, 32, 64, 128]
    padded = (96, 80)
    sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in strides]  # (12,10) (6,5) (3,3) (2,2) (1,1)
    points, anchors, counts = anchors_for(sizes, strides)
    assert min(counts) < 9  # levels with fewer anchors than topk are part of the case
    image_sizes = [(96, 80), (70, 53), (96, 80)]
    num_boxes = [6, 4, 0]
    num_gt = max(num_boxes)
    gt_boxes = torch.zeros(len(image_sizes), num_gt, 4)
    gt_labels = torch.randint(0, NUM_CLASSES, (len(image_sizes), num_gt), generator=g)
    gt_valid = torch.zeros(len(image_sizes), num_gt, dtype=torch.bool)
    for i, ((h, w), n) in enumerate(zip(image_sizes, num_boxes)):
        gt_boxes[i, :n] = random_boxes(g, n, h, w)
        gt_valid[i, :n] = True
    gt_valid[0, 5] = False  # a crowd box: takes no part
    # Anchors whose centre lies in an image's padding are excluded, as mmdet's valid flags do.
    anchor_valid = torch.stack([(points[:, 0] < w) & (points[:, 1] < h) for h, w in image_sizes])
    assert not anchor_valid[1].all()

    labels, boxes = atss_targets(anchors, counts, gt_boxes, gt_labels, gt_valid, NUM_CLASSES,
                                 anchor_valid=anchor_valid)
    assert labels.shape == (3, anchors.shape[0]) and boxes.shape == (3, anchors.shape[0], 4)
    total_pos = 0
    for i in range(len(image_sizes)):
        keep = anchor_valid[i]
        level_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        counts_inside = torch.bincount(level_of[keep], minlength=len(counts)).tolist()
        gts = gt_boxes[i][gt_valid[i]]
        gt_ids = gt_valid[i].nonzero().flatten()
        inds = torch.zeros(anchors.shape[0], dtype=torch.long)
        inds[keep] = mmdet_atss_loop(anchors[keep], counts_inside, gts)
        pos = inds > 0
        want_labels = torch.full_like(inds, NUM_CLASSES)
        want_labels[pos] = gt_labels[i, gt_ids[inds[pos] - 1]]
        want_boxes = torch.zeros(anchors.shape[0], 4)
        want_boxes[pos] = gts[inds[pos] - 1]
        assert torch.equal(labels[i], want_labels), i
        assert torch.equal(boxes[i], want_boxes), i
        total_pos += int(pos.sum())
    assert total_pos > 10  # the case is not trivially all background
    assert (labels[2] == NUM_CLASSES).all()  # the image without boxes


def test_box_spanning_two_levels():
    # Level 0: stride 8, 64 px anchors at (8i, 8j); level 1: stride 16, 128 px anchors at (16i, 16j).
    # Box 64 x 128 centred at (64, 64), a grid point of both levels: candidates are the 3x3 neighbourhoods.
    #   level 0: x-overlap 64 - 8|dx|, y-overlap 64 -> IoU 4096/8192 = 1/2 (dx = 0), 3584/8704 = 7/17 else;
    #   level 1: x-overlap 64, y-overlap 128 - 16|dy| -> IoU 8192/16384 = 1/2 (dy = 0), 7168/17408 = 7/17.
    # 6 candidates at 1/2, 12 at 7/17: mean 7.5/17, unbiased std 3/(17 sqrt 17): threshold 0.484 -> the six
    # candidates at IoU 1/2 are positive: a column on level 0, a row on level 1. All centres lie inside.
    points, anchors, counts = anchors_for([(16, 16), (8, 8)], [8, 16])
    box = torch.tensor([[[32.0, 0.0, 96.0, 128.0]]])
    labels, boxes = atss_targets(anchors, counts, box, torch.tensor([[3]]), torch.tensor([[True]]), NUM_CLASSES)
    pos = (labels[0] == 3).nonzero().flatten()
    level0 = sorted(tuple(points[i].int().tolist()) for i in pos if i < counts[0])
    level1 = sorted(tuple(points[i].int().tolist()) for i in pos if i >= counts[0])
    assert level0 == [(64, 56), (64, 64), (64, 72)]
    assert level1 == [(48, 64), (64, 64), (80, 64)]
    assert ((labels[0] == 3) | (labels[0] == NUM_CLASSES)).all()
    assert torch.equal(boxes[0, pos], box[0].expand(len(pos), 4))
    assert (boxes[0, labels[0] == NUM_CLASSES] == 0).all()


def test_threshold_uses_unbiased_std():
    # Box [5, 34, 53, 59] on a 64 px image, five levels: its candidates' IoUs give mean + std = 0.25577 with
    # torch.std's n - 1 (mmdet) but 0.25327 with n. The anchors at x = 16 (IoU 0.25468, centres inside the
    # box) fall in between: negative here. The positives are the 8 anchors of IoU 0.293 and 0.270.
    points, anchors, counts = anchors_for([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128])
    box = torch.tensor([[[5.0, 34.0, 53.0, 59.0]]])
    labels, _ = atss_targets(anchors, counts, box, torch.tensor([[0]]), torch.tensor([[True]]), NUM_CLASSES)
    pos = sorted(tuple(points[i].int().tolist()) for i in (labels[0] == 0).nonzero().flatten())
    assert pos == [(24, 40), (24, 48), (24, 56), (32, 40), (32, 48), (32, 56), (40, 40), (40, 48)]
    assert torch.equal(labels[0] == 0, mmdet_atss_loop(anchors, counts, box[0]) > 0)


def test_anchor_centre_must_be_inside_by_more_than_001():
    # One level, stride 8. Box x in [x1, 75.995] (about 20 wide), y in [29, 99] (70 tall), centre (~66, 64):
    # candidates are columns {56, 64, 72} x rows {56, 64, 72}. Every anchor contains the box's x-extent;
    # y-overlap is 64 in row 64 and 59 in rows 56, 72, so IoU 0.3036 (row 64) vs 0.2734: threshold 0.2986
    # keeps row 64. Its anchor at x = 56 lies 56 - x1 inside the box: positive only if that is > 0.01.
    points, anchors, counts = anchors_for([(16, 16)], [8])

    def positives(x1):
        box = torch.tensor([[[x1, 29.0, 75.995, 99.0]]])
        labels, _ = atss_targets(anchors, counts, box, torch.tensor([[0]]), torch.tensor([[True]]), NUM_CLASSES)
        return sorted(tuple(points[i].int().tolist()) for i in (labels[0] == 0).nonzero().flatten())

    assert positives(55.995) == [(64, 64), (72, 64)]  # 0.005 inside: not inside by mmdet's rule
    assert positives(55.98) == [(56, 64), (64, 64), (72, 64)]  # 0.02 inside


def test_conflict_goes_to_highest_iou():
    # Two boxes share candidates; the anchor at (32, 32) is positive for both: it must take the box it
    # overlaps more. Box A (64 x 64, = the anchor) has IoU 1 there, box B (larger) less.
    points, anchors, counts = anchors_for([(8, 8)], [8])
    gt = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [-4.0, -4.0, 68.0, 76.0]]])
    labels, boxes = atss_targets(anchors, counts, gt, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool),
                                 NUM_CLASSES)
    centre = points.tolist().index([32.0, 32.0])
    assert labels[0, centre] == 1 and torch.equal(boxes[0, centre], gt[0, 0])
    # and the whole assignment agrees with the loop port (which resolves conflicts the same way)
    inds = mmdet_atss_loop(anchors, counts, gt[0])
    assert torch.equal(labels[0], torch.where(inds > 0, torch.tensor([1, 2])[(inds - 1).clamp(min=0)],
                                              torch.tensor(NUM_CLASSES)))
    assert (inds == 2).any()  # B keeps anchors of its own


def test_no_boxes_crowd_boxes_and_batch_independence():
    # (With only two levels, 9 equal IoUs per level on a 48 px image give mean + std above both: no positive.)
    points, anchors, counts = anchors_for([(6, 6), (3, 3), (2, 2), (1, 1), (1, 1)], [8, 16, 32, 64, 128])
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [10.0, 10.0, 21.0, 44.0], [19.0, 3.0, 46.0, 46.0]])
    # no ground truth at all (G = 0)
    labels, assigned = atss_targets(anchors, counts, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
                                    torch.zeros(2, 0, dtype=torch.bool), NUM_CLASSES)
    assert (labels == NUM_CLASSES).all() and (assigned == 0).all() and labels.shape == (2, anchors.shape[0])
    # image 0 has 3 boxes of which one is crowd, image 1 only padding: crowd == absent, image 1 background
    gt = torch.zeros(2, 3, 4)
    gt[0] = boxes
    lab = torch.tensor([[0, 1, 2], [0, 0, 0]])
    valid = torch.tensor([[True, False, True], [False, False, False]])
    labels, assigned = atss_targets(anchors, counts, gt, lab, valid, NUM_CLASSES)
    assert (labels[1] == NUM_CLASSES).all()
    assert not (labels[0] == 1).any()
    alone, alone_boxes = atss_targets(anchors, counts, boxes[[0, 2]][None], lab[:1, [0, 2]],
                                      torch.ones(1, 2, dtype=torch.bool), NUM_CLASSES)
    assert torch.equal(labels[:1], alone) and torch.equal(assigned[:1], alone_boxes)
    assert (alone < NUM_CLASSES).any()


def test_bad_level_counts():
    _, anchors, counts = anchors_for([(4, 4)], [8])
    with pytest.raises(ValueError, match="num_level_anchors"):
        atss_targets(anchors, [counts[0] + 1], torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long),
                     torch.ones(1, 1, dtype=torch.bool), NUM_CLASSES)
