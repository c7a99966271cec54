"""Target assignment for dense detectors (FCOS, ATSS for VFNet), vectorised over images, locations and boxes."""

from __future__ import annotations

from typing import Sequence

import torch

from lit_tasks.ops.box_ops import box_iou

INF = 1e8
# Per-level limits on max(l, t, r, b) in pixels for P3..P7, both ends inclusive (REFERENCE.md §3.2).
FCOS_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))


def check_regress_ranges(ranges: Sequence[Sequence[float]] | None, num_levels: int = 5, what: str = "") -> None:
    """Fail early on regress ranges that are not ``num_levels`` increasing ``[lo, hi]`` pairs (``what`` prefixes)."""
    if ranges is None:
        return
    prefix = f"{what}: " if what else ""
    pairs = [tuple(r) for r in ranges]
    if len(pairs) != num_levels or any(len(r) != 2 or not r[0] < r[1] for r in pairs):
        raise ValueError(f"{prefix}regress_ranges must be {num_levels} [lo, hi] pairs with lo < hi "
                         f"(one per level P3..P7), got {ranges}")
    if any(a[0] > b[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"{prefix}regress_ranges must increase from P3 to P7, got {ranges}")


def grid_points(
    sizes: list[tuple[int, int]], strides: list[int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locations of every feature cell, all levels concatenated finest first.

    A cell (x, y) of a level with stride s sits at (x*s + s//2, y*s + s//2) (FCOS §3.1, mmdet).

    Returns:
        points (P, 2) xy pixels, strides (P,), level index (P,).
    """
    points, point_strides, levels = [], [], []
    for level, ((h, w), s) in enumerate(zip(sizes, strides)):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1))
        point_strides.append(torch.full((h * w,), float(s), device=device))
        levels.append(torch.full((h * w,), level, device=device, dtype=torch.long))
    return torch.cat(points), torch.cat(point_strides), torch.cat(levels)


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) (FCOS eq. 3); 0 where a distance is not positive."""
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-12)) * (
        tb.min(-1).values / tb.max(-1).values.clamp(min=1e-12)
    )
    return ratio.clamp(min=0).sqrt()


def fcos_targets(
    points: torch.Tensor,
    strides: torch.Tensor,
    levels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    num_classes: int,
    center_radius: float = 1.5,
    regress_ranges: tuple[tuple[float, float], ...] = FCOS_REGRESS_RANGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS targets for a padded batch of ground truths (FCOS §3.2 with centre sampling, mmdet rules).

    A location is positive for a box if it lies inside the box (or, with ``center_radius > 0``, inside the
    box's centre region ``centre ± radius * stride`` clipped to the box) and max(l, t, r, b) lies in its
    level's regress range (inclusive). Among several qualifying boxes the one of smallest area wins.

    Args:
        points: (P, 2) location xy; strides, levels: (P,) from ``grid_points``.
        gt_boxes: (B, G, 4) xyxy pixels, padded; gt_labels: (B, G) int64; gt_valid: (B, G) bool
            (False for padding and boxes to ignore, e.g. crowd).
        num_classes: foreground classes; the background label is ``num_classes``.

    Returns:
        labels (B, P) int64 with ``num_classes`` for background, ltrb (B, P, 4) pixel distances to the
        assigned box (meaningless for background).
    """
    batch, num_gt = gt_labels.shape
    num_points = points.shape[0]
    if num_gt == 0:
        return (
            gt_labels.new_full((batch, num_points), num_classes),
            points.new_zeros((batch, num_points, 4)),
        )
    px = points[:, 0].view(1, -1, 1)
    py = points[:, 1].view(1, -1, 1)
    x1, y1, x2, y2 = (gt_boxes[..., i].unsqueeze(1) for i in range(4))  # (B, 1, G)
    ltrb = torch.stack((px - x1, py - y1, x2 - px, y2 - py), dim=-1)  # (B, P, G, 4)

    if center_radius > 0:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        radius = strides.view(1, -1, 1) * center_radius
        inside = (
            torch.stack(
                (
                    px - torch.maximum(cx - radius, x1),
                    py - torch.maximum(cy - radius, y1),
                    torch.minimum(cx + radius, x2) - px,
                    torch.minimum(cy + radius, y2) - py,
                ),
                dim=-1,
            ).min(-1).values
            > 0
        )
    else:
        inside = ltrb.min(-1).values > 0

    ranges = torch.tensor(regress_ranges, dtype=points.dtype, device=points.device)[levels]  # (P, 2)
    max_dist = ltrb.max(-1).values
    in_range = (max_dist >= ranges[:, 0].view(1, -1, 1)) & (max_dist <= ranges[:, 1].view(1, -1, 1))

    area = ((x2 - x1) * (y2 - y1)).expand(batch, num_points, num_gt)
    ok = inside & in_range & gt_valid.unsqueeze(1)
    area = torch.where(ok, area, torch.full_like(area, INF))
    min_area, index = area.min(dim=-1)  # first index on ties, as mmdet

    labels = torch.gather(gt_labels, 1, index)
    labels = torch.where(min_area >= INF, torch.full_like(labels, num_classes), labels)
    ltrb = torch.gather(ltrb, 2, index[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return labels, ltrb


def pad_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """List of target dicts -> padded (B, G, 4) boxes, (B, G) labels, (B, G) valid (crowd boxes invalid)."""
    num = max((len(t["labels"]) for t in targets), default=0)
    boxes = torch.zeros((len(targets), num, 4), device=device)
    labels = torch.zeros((len(targets), num), dtype=torch.long, device=device)
    valid = torch.zeros((len(targets), num), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"].to(device, torch.float32)
        labels[i, :n] = t["labels"].to(device)
        crowd = t.get("iscrowd")
        valid[i, :n] = True if crowd is None else ~crowd.to(device).bool()
    return boxes, labels, valid


# --- ATSS (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free Detection", Alg. 1) ---


def square_anchors(points: torch.Tensor, strides: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    """One square anchor per location: side ``scale * stride``, centred on the point ``(P, 2) -> (P, 4)`` xyxy.

    VFNet's ATSS anchors (mmdet AnchorGenerator, ratio 1, octave_base_scale 8, scales_per_octave 1).
    """
    half = (strides * (scale / 2)).unsqueeze(-1)
    return torch.cat((points - half, points + half), dim=-1)


def atss_targets(
    anchors: torch.Tensor,
    num_level_anchors: list[int],
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_valid: torch.Tensor,
    num_classes: int,
    topk: int = 9,
    anchor_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive Training Sample Selection for a padded batch of ground truths (ATSS Alg. 1, mmdet ATSSAssigner).

    For each ground truth and pyramid level, the ``topk`` anchors whose centres are closest (L2) to the box
    centre are candidates (fewer where a level has fewer anchors). The box's IoU threshold is the mean plus
    the standard deviation of its candidates' IoUs (unbiased, n - 1, as ``torch.std`` in mmdet). A candidate
    is positive when its IoU >= the threshold and its centre lies inside the box by more than 0.01 px on
    every side (mmdet's rule). An anchor positive for several boxes goes to the one of highest IoU (first
    box on exact ties, as ``max``). Vectorised over images, anchors and boxes; the only loop is over levels.

    Differences from mmdet, on purpose: anchors outside an image are marked with ``anchor_valid`` instead of
    being removed (same result: they can be neither candidates nor positives); a box with a single valid
    candidate gets std 0 (torch.std gives NaN, so mmdet silently assigns it nothing).

    Args:
        anchors: (P, 4) xyxy, all levels concatenated finest first (e.g. :func:`square_anchors`).
        num_level_anchors: anchors per level, summing to P.
        gt_boxes: (B, G, 4) xyxy pixels, padded; gt_labels: (B, G) int64; gt_valid: (B, G) bool (False for
            padding and boxes not to train on, e.g. crowd: they take no part at all, as mmdet's ignored boxes
            with ``ignore_iof_thr=-1``).
        num_classes: foreground classes; the background label is ``num_classes``.
        topk: candidates per level and box (9).
        anchor_valid: optional (B, P) bool, False for anchors of an image's padding.

    Returns:
        labels (B, P) int64 with ``num_classes`` for background, boxes (B, P, 4) xyxy of the assigned ground
        truth (zeros for background).
    """
    batch, num_gt = gt_labels.shape
    num_anchors = anchors.shape[0]
    if sum(num_level_anchors) != num_anchors:
        raise ValueError(f"atss_targets: num_level_anchors {list(num_level_anchors)} sum to "
                         f"{sum(num_level_anchors)}, but there are {num_anchors} anchors")
    labels = gt_labels.new_full((batch, num_anchors), num_classes)
    assigned = gt_boxes.new_zeros((batch, num_anchors, 4), dtype=torch.float32)
    if num_gt == 0 or num_anchors == 0:
        return labels, assigned
    anchors, gt_boxes = anchors.float(), gt_boxes.float()

    iou = box_iou(anchors, gt_boxes)  # (B, P, G)
    anchor_centre = (anchors[:, :2] + anchors[:, 2:]) / 2  # (P, 2)
    gt_centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
    distance = (anchor_centre[None, :, None] - gt_centre[:, None]).pow(2).sum(-1).sqrt()  # (B, P, G)
    if anchor_valid is not None:
        distance = distance.masked_fill(~anchor_valid[..., None], float("inf"))

    candidates, start = [], 0
    for count in num_level_anchors:
        k = min(topk, count)
        if k > 0:
            candidates.append(distance[:, start : start + count].topk(k, dim=1, largest=False).indices + start)
        start += count
    candidate = torch.cat(candidates, dim=1)  # (B, K, G) anchor indices, unique per (image, box)

    candidate_iou = iou.gather(1, candidate)
    usable = gt_valid[:, None, :].expand_as(candidate)
    if anchor_valid is not None:
        usable = usable & anchor_valid.gather(1, candidate.flatten(1)).view_as(candidate)
    count = usable.sum(1, keepdim=True)  # (B, 1, G)
    mean = (candidate_iou * usable).sum(1, keepdim=True) / count.clamp(min=1)
    var = ((candidate_iou - mean) * usable).pow(2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    threshold = mean + var.sqrt()

    centre = anchor_centre[candidate]  # (B, K, G, 2)
    x1, y1, x2, y2 = gt_boxes[:, None].unbind(-1)  # (B, 1, G)
    inside = torch.stack(
        (centre[..., 0] - x1, centre[..., 1] - y1, x2 - centre[..., 0], y2 - centre[..., 1]), dim=-1
    ).min(-1).values > 0.01
    positive = usable & inside & (candidate_iou >= threshold)

    # IoU of every (anchor, box) pair that is a positive candidate, -1 elsewhere; the best box per anchor.
    score = iou.new_full((batch, num_anchors, num_gt), -1.0)
    score.scatter_(1, candidate, torch.where(positive, candidate_iou, torch.full_like(candidate_iou, -1.0)))
    best, index = score.max(dim=-1)  # (B, P)
    is_pos = best >= 0
    labels = torch.where(is_pos, gt_labels.gather(1, index), labels)
    boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    assigned = torch.where(is_pos[..., None], boxes, assigned)
    return labels, assigned
