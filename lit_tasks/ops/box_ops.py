"""Box formats, areas, and pairwise / aligned IoU.

Boxes are ``(..., 4)`` tensors whose format is in the function name: ``xyxy`` = corners (x1, y1, x2, y2),
``cxcywh`` = centre and size, ``xywh`` = top-left corner and size (COCO json). Everything computes in
float32 (float64 stays float64) because pixel-sized areas lose most of their digits in half precision;
half, bfloat16 and integer inputs therefore give float32 outputs.

Degenerate (zero-area) boxes are normal data here: no function asserts on them and none returns NaN.
Inverted boxes (x2 < x1) are not checked (that would cost a device sync per call) and give meaningless values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """``t`` as float32 unless it is already float32 or float64 (IoU needs the mantissa)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = upcast(boxes).unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = upcast(boxes).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (x1, y1, w, h), the COCO json format."""
    x1, y1, x2, y2 = upcast(boxes).unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(x1, y1, w, h) -> (x1, y1, x2, y2)."""
    x1, y1, w, h = upcast(boxes).unbind(-1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes ``(..., 4) -> (...)``."""
    boxes = upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlap_area(lt: Tensor, rb: Tensor) -> Tensor:
    # relu, not clamp: boxes that only touch (overlap width 0) pass no gradient through the empty
    # intersection, the same as torchvision's loss masks `(x2 > x1) & (y2 > y1)`.
    wh = (rb - lt).relu()
    return wh[..., 0] * wh[..., 1]


def _pairwise_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = _overlap_area(lt, rb)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise IoU of xyxy boxes ``(N, 4), (M, 4) -> (N, M)``.

    The union is clamped at ``eps`` (not offset by it), so values equal ``torchvision.ops.box_iou`` for every
    union >= eps and two zero-area boxes get IoU 0 instead of NaN.
    """
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise GIoU = IoU - (|C| - |A u B|) / |C| (Rezatofighi et al. 2019, Alg. 1), ``(N, M)`` in [-1, 1].

    C is the smallest box enclosing both. Denominators are clamped at ``eps`` like :func:`box_iou`, so
    degenerate boxes give finite values and no assertion fires (unlike DETR's util/box_ops.py).
    """
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area_c = wh[..., 0] * wh[..., 1]
    return inter / union.clamp(min=eps) - (area_c - union) / area_c.clamp(min=eps)


def aligned_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of matching rows ``(..., 4), (..., 4) -> (...), (...)``."""
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = _overlap_area(lt, rb)
    return inter, box_area(boxes1) + box_area(boxes2) - inter


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of matching rows ``(..., 4), (..., 4) -> (...)``, = I / (U + eps) as in torchvision's IoU losses."""
    inter, union = aligned_inter_union(boxes1, boxes2)
    return inter / (union + eps)


def enclosing_box(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Smallest xyxy box containing both boxes of each matching row ``(..., 4)``."""
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    return torch.cat([torch.min(boxes1[..., :2], boxes2[..., :2]), torch.max(boxes1[..., 2:], boxes2[..., 2:])], -1)


def distance2bbox(points: Tensor, distances: Tensor) -> Tensor:
    """Decode FCOS distances: points ``(..., 2)`` (x, y) and (l, t, r, b) ``(..., 4)`` -> xyxy ``(..., 4)``.

    Shapes broadcast. No clipping to the image: the caller knows the image size.
    """
    x, y = upcast(points).unbind(-1)
    left, top, right, bottom = upcast(distances).unbind(-1)
    return torch.stack([x - left, y - top, x + right, y + bottom], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS regression target: distances (l, t, r, b) from points ``(..., 2)`` to the sides of xyxy boxes.

    Shapes broadcast, so ``bbox2distance(points[:, None], boxes[None])`` gives ``(P, M, 4)`` for P points and
    M boxes. A point lies strictly inside its box iff all four distances are > 0.
    """
    x, y = upcast(points).unbind(-1)
    x1, y1, x2, y2 = upcast(boxes).unbind(-1)
    return torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1)


def rescale_boxes(boxes: Tensor, size: Tensor, orig_size: Tensor) -> Tensor:
    """Map xyxy boxes from an image of (h, w) = ``size`` to one of (h, w) = ``orig_size`` (per-axis scaling)."""
    scale = (orig_size.to(boxes) / size.to(boxes)).flip(0).repeat(2)  # (sx, sy, sx, sy)
    return boxes * scale
