"""Target assignment for dense detectors (FCOS), vectorised over images, locations and boxes."""

from __future__ import annotations

import torch

INF = 1e8
# Per-level limits on max(l, t, r, b) in pixels for P3..P7, both ends inclusive (REFERENCE.md §3.2).
FCOS_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))


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
