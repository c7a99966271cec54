"""The post-processing tail of dense detectors (FCOS, VFNet): per-level candidates inside the image, decode, clip,
class-wise NMS, keep the best. One image at a time, as detectron2's ``DenseDetector``
(``_decode_per_level_predictions``, then ``batched_nms``) and mmdetection's ``_predict_by_feat_single``.

Only locations whose point lies inside the image's own ``(h, w)`` are candidates, and they are chosen before each
level's top-k: a location in the padding of a batch (or of the image's own multiple of 32) never yields a detection
and never takes a place of the top-k budget. The detectors differ in how a level spends its budget:
``"pairs"`` (FCOS repo's ``FCOSPostProcessor``: the k best (location, class) pairs among the candidate pairs) or
``"locations"`` (mmdet v2 ``VFNetHead.get_bboxes``: the k locations of highest maximum class score, then every
candidate pair of theirs).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from lit_tasks.ops.box_ops import distance2bbox

# Class (and centerness) logit a detector gives the locations beyond an image's own grid in an evaluation batch:
# probability 0, so focal, varifocal and BCE losses are exactly 0 there (finite: -inf makes BCE-with-logits NaN);
# representable in float16. Those locations lie outside the image, so they never reach a detection either.
PADDED_LOGIT = -1e4


def points_inside(points: Tensor, image_size: Sequence[int]) -> Tensor:
    """``(P,)`` True where a location's point ``(x, y)`` lies inside an image of ``(h, w)``: ``x < w and y < h``."""
    h, w = (int(v) for v in image_size)
    return (points[:, 0] < w) & (points[:, 1] < h)


def topk_pairs(rank: Tensor, candidate: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` candidate (location, class) pairs of highest ``rank`` ``(P, C)``, best first (FCOS repo) ->
    location and class indices. The top-k runs over the candidates only (torchvision's FCOS too): a level has
    P x C pairs, its candidates are few."""
    location, label = candidate.nonzero(as_tuple=True)
    top = rank[location, label].topk(min(k, location.numel())).indices
    return location[top], label[top]


def topk_locations(rank: Tensor, candidate: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` locations of highest maximum ``rank`` ``(P, C)``, then their candidate pairs, by location rank then
    class (mmdet v2 ``VFNetHead.get_bboxes``) -> location and class indices."""
    top = rank.max(dim=1).values.topk(min(k, rank.shape[0])).indices
    location, label = candidate[top].nonzero(as_tuple=True)
    return top[location], label


TOP_K = {"pairs": topk_pairs, "locations": topk_locations}


def dense_detections(
    rank: Tensor,
    candidate: Tensor,
    ltrb: Tensor,
    points: Tensor,
    level_counts: Sequence[int],
    image_size: Sequence[int],
    *,
    pre_nms_top_k: int,
    nms_threshold: float,
    max_detections: int,
    top_k: Literal["pairs", "locations"] = "pairs",
    score_transform: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """One image's detections from dense per-location predictions over all levels.

    Args:
        rank: ``(P, C)`` score of each (location, class) pair, by which the top-k and NMS choose.
        candidate: ``(P, C)`` bool, the pairs that may be kept (their score passed the threshold).
        ltrb: ``(P, 4)`` distances (l, t, r, b) from each location's point to its box sides, in pixels.
        points: ``(P, 2)`` location points (x, y) in pixels; P runs over levels finest first.
        level_counts: locations of each level (they sum to P).
        image_size: the image's own ``(h, w)``: points outside are no candidates, boxes are clipped to it.
        pre_nms_top_k: each level's budget (see ``top_k``).
        nms_threshold: IoU of class-wise NMS; max_detections: detections kept, best first.
        top_k: ``"pairs"`` or ``"locations"`` (module docstring).
        score_transform: maps the chosen pairs' ``rank`` to the reported score (monotone; FCOS: sqrt).

    Returns:
        ``{"boxes": (N, 4) xyxy pixels, "scores": (N,), "labels": (N,) int64}``, best score first.
    """
    select = TOP_K[top_k]
    inside = points_inside(points, image_size)
    locations, labels = [], []
    start = 0
    for count in level_counts:
        level = slice(start, start + count)
        start += count
        if bool(inside[level].all()):  # an image filling the level: no copy
            location, label = select(rank[level], candidate[level], pre_nms_top_k)
            locations.append(location + level.start)
        else:
            kept = inside[level].nonzero().squeeze(1) + level.start
            location, label = select(rank[kept], candidate[kept], pre_nms_top_k)
            locations.append(kept[location])
        labels.append(label)
    location, label = torch.cat(locations), torch.cat(labels)
    boxes = clip_boxes_to_image(distance2bbox(points[location], ltrb[location]), tuple(int(v) for v in image_size))
    scores = rank[location, label]
    if score_transform is not None:
        scores = score_transform(scores)
    keep = batched_nms(boxes, scores, label, nms_threshold)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": label[keep]}
