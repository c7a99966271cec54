"""IoU-family box regression losses on aligned xyxy boxes: IoU, GIoU, DIoU, CIoU.

Each takes ``pred`` and ``target`` of the same shape ``(..., 4)`` and returns the per-box loss (or its
mean / sum). Values follow ``torchvision.ops`` (eps = 1e-7 added to the union, the enclosing area and the
enclosing diagonal), computed in float32 whatever the input dtype or autocast state. Touching, nested,
disjoint and zero-area boxes give finite values and gradients.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from lit_tasks.losses.reduction import reduce_loss
from lit_tasks.ops.box_ops import aligned_inter_union, box_area, box_xyxy_to_cxcywh, enclosing_box, upcast


def _check(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    # Broadcasting (N, 4) against (1, 4) or (M, 4) would silently pair the wrong boxes.
    if pred.shape != target.shape or pred.shape[-1:] != (4,):
        raise ValueError(f"IoU loss needs pred and target of the same shape (..., 4), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return upcast(pred), upcast(target)


def _iou_and_centre_penalty(pred: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """IoU and the DIoU penalty rho^2 / c^2 (Zheng et al. 2020, Eq. 6)."""
    inter, union = aligned_inter_union(pred, target)
    enclosing = enclosing_box(pred, target)
    diagonal2 = ((enclosing[..., 2:] - enclosing[..., :2]) ** 2).sum(-1) + eps
    centre2 = ((box_xyxy_to_cxcywh(pred)[..., :2] - box_xyxy_to_cxcywh(target)[..., :2]) ** 2).sum(-1)
    return inter / (union + eps), centre2 / diagonal2


def _aspect_angle(boxes: Tensor) -> Tensor:
    """atan(w / h), defined as 0 for a point box (w = h = 0) so that neither values nor gradients are NaN."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    # atan2 = atan(w / h) for h > 0 and stays finite (pi/2) with a finite gradient for flat boxes (h = 0).
    return torch.atan2(w, h.masked_fill((w == 0) & (h == 0), 1.0))


def iou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7,
             linear: bool = False) -> Tensor:
    """IoU loss: -ln(IoU) (UnitBox, Yu et al. 2016) or 1 - IoU with ``linear=True``.

    IoU = I / (U + eps) is clamped at ``eps`` before the log as in mmdet, so disjoint boxes give
    -ln(eps) (16.1 for 1e-7; mmdet's default eps is 1e-6, giving 13.8) and no gradient.
    """
    pred, target = _check(pred, target)
    inter, union = aligned_inter_union(pred, target)
    iou = inter / (union + eps)
    loss = 1 - iou if linear else -iou.clamp(min=eps).log()
    return reduce_loss(loss, reduction)


def giou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - GIoU, GIoU = IoU - (|C| - U) / |C| (Rezatofighi et al. 2019, Alg. 2); in [0, 2]."""
    pred, target = _check(pred, target)
    inter, union = aligned_inter_union(pred, target)
    area_c = box_area(enclosing_box(pred, target))
    giou = inter / (union + eps) - (area_c - union) / (area_c + eps)
    return reduce_loss(1 - giou, reduction)


def diou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - DIoU = 1 - IoU + rho^2 / c^2 (Zheng et al. 2020, Eq. 7): rho = centre distance, c = C's diagonal."""
    pred, target = _check(pred, target)
    iou, penalty = _iou_and_centre_penalty(pred, target, eps)
    return reduce_loss(1 - iou + penalty, reduction)


def ciou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7,
              alpha_gate: bool = False) -> Tensor:
    """1 - CIoU = 1 - IoU + rho^2 / c^2 + alpha * v (Zheng et al. 2020, Eqs. 8-11).

    v = 4 / pi^2 (atan(w_gt / h_gt) - atan(w / h))^2 and alpha = v / (1 - IoU + v + eps), computed under
    ``no_grad`` (treated as a constant, as the paper's gradient analysis and torchvision do). mmdet and the
    authors' repo (Zzh-tju/CIoU) zero alpha where IoU <= 0.5; ``alpha_gate=True`` does the same.
    """
    pred, target = _check(pred, target)
    iou, penalty = _iou_and_centre_penalty(pred, target, eps)
    v = (4 / math.pi**2) * (_aspect_angle(target) - _aspect_angle(pred)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
        if alpha_gate:
            alpha = alpha * (iou > 0.5)
    return reduce_loss(1 - iou + penalty + alpha * v, reduction)


IOU_LOSSES: dict[str, Callable[..., Tensor]] = {
    "iou": iou_loss,
    "linear_iou": partial(iou_loss, linear=True),
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
}


def box_loss(name: str) -> Callable[..., Tensor]:
    """The loss named by a task's ``box_loss`` argument: one of :data:`IOU_LOSSES`."""
    if name not in IOU_LOSSES:
        raise ValueError(f"box_loss must be one of {sorted(IOU_LOSSES)}, got {name!r}")
    return IOU_LOSSES[name]
