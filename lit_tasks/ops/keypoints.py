"""Top-down keypoints on the task side: crop pixels <-> original-image pixels (torch, batched, float64 inside).

A top-down pose network sees a crop cut from the image by an affine map ``u = A x + t`` (person box ->
``W x H`` crop, :mod:`datamodules.keypoints.geometry`). Its predictions are crop pixels; evaluation, OKS NMS and
COCO results need image pixels, i.e. the inverse map ``x = A^-1 u - A^-1 t``, carried in each batch as the
``(2, 3)`` matrix ``matrix_inv``. :func:`crop_to_image` rebuilds that inverse from the person box alone, for
users who run ``PoseTask(crops)`` on crops they cut themselves with the standard rule (box widened to the
crop's aspect ratio about its centre, times ``padding``; no rotation).

``datamodules`` (which ``lit_tasks`` never imports) holds the NumPy version of the same box rule
(``box_xywh_to_center_scale`` / ``get_affine_transform``); ``tests/test_pose_ops.py`` checks both agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# The mirror permutation of the 17 COCO person keypoints (nose, eyes, ears, shoulders, ... ankles): left <-> right.
COCO_FLIP_INDEX: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def affine_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply ``(2, 3)`` affine matrices to ``(..., 2+)`` points: ``p @ M[:, :2]^T + M[:, 2]`` on the first two columns.

    Args:
        points: ``(B, K, C)`` with ``C >= 2`` (extra columns, e.g. scores, are passed through), or ``(K, C)``.
        matrix: ``(B, 2, 3)`` (one matrix per instance) or ``(2, 3)`` (shared).

    Returns:
        Points of the same shape and dtype; the product is computed in float64.
    """
    if points.shape[-1] < 2:
        raise ValueError(f"affine_points: points must end with (x, y), got shape {tuple(points.shape)}")
    if matrix.shape[-2:] != (2, 3) or matrix.ndim not in (2, points.ndim):
        raise ValueError(f"affine_points: matrix must be (2, 3) or one (2, 3) per instance, got {tuple(matrix.shape)} "
                         f"for points {tuple(points.shape)}")
    if matrix.ndim == 3 and matrix.shape[0] != points.shape[0]:
        raise ValueError(f"affine_points: {matrix.shape[0]} matrices for {points.shape[0]} instances")
    m = matrix.to(device=points.device, dtype=torch.float64)
    xy = points[..., :2].to(torch.float64)
    moved = xy @ m[..., :2].transpose(-1, -2) + m[..., None, :, 2] if m.ndim == 3 else xy @ m[:, :2].T + m[:, 2]
    return torch.cat([moved.to(points.dtype), points[..., 2:]], dim=-1)


def box_xywh_to_crop_inverse(boxes_xywh: Tensor, input_size: Sequence[int], padding: float = 1.25) -> Tensor:
    """``(B, 2, 3)`` float64 crop -> image maps of the crops cut from ``(B, 4)`` person boxes ``[x, y, w, h]``.

    The region is the box widened (never shrunk) to the crop's aspect ratio ``W / H`` about its centre, times
    ``padding`` (the official ``_box_to_center_scale``, REFERENCE.md §8.1); the crop's pixel ``(u, v)`` maps to
    ``center + ((u, v) - (W / 2, H / 2)) * scale_w / W`` (no rotation). ``input_size = (H, W)``.
    """
    if boxes_xywh.ndim != 2 or boxes_xywh.shape[1] != 4:
        raise ValueError(f"box_xywh_to_crop_inverse: boxes must be (B, 4) [x, y, w, h], got {tuple(boxes_xywh.shape)}")
    h_out, w_out = float(input_size[0]), float(input_size[1])
    boxes = boxes_xywh.to(torch.float64)
    if not bool(((boxes[:, 2] > 0) & (boxes[:, 3] > 0)).all()):
        raise ValueError(f"box_xywh_to_crop_inverse: every box needs a positive width and height, got "
                         f"{boxes[(boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)][:3].tolist()}")
    aspect = w_out / h_out
    w, h = boxes[:, 2], boxes[:, 3]
    width = torch.where(w > aspect * h, w, h * aspect) * padding  # region width after the aspect fix
    step = width / w_out  # image pixels per crop pixel (1 / k)
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    out = boxes.new_zeros(boxes.shape[0], 2, 3)
    out[:, 0, 0] = step
    out[:, 1, 1] = step
    out[:, 0, 2] = cx - step * w_out / 2
    out[:, 1, 2] = cy - step * h_out / 2
    return out


def crop_to_image(keypoints: Tensor, boxes_xywh: Tensor, input_size: Sequence[int], padding: float = 1.25) -> Tensor:
    """Keypoints predicted on person crops (``(B, K, 2|3)`` crop pixels) -> original-image pixels.

    ``boxes_xywh`` ``(B, 4)`` are the person boxes the crops were cut from (COCO ``[x, y, w, h]``), with the
    standard rule of :func:`box_xywh_to_crop_inverse` (aspect ratio of ``input_size = (H, W)``, ``padding``
    1.25, no rotation) -- what ``COCOKeypointDataModule`` does at evaluation. A third column (scores) is kept.
    """
    return affine_points(keypoints, box_xywh_to_crop_inverse(boxes_xywh, input_size, padding))
