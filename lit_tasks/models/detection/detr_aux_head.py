"""Co-DETR's auxiliary dense head (Zong et al. ICCV 2023, §3.2): one-to-many supervision of DETR's encoder, in
training only; off by default (the paper's DETR).

Bipartite matching gives each object one positive query, so the encoder, and a backbone trained from scratch,
learn from a sparse signal. Co-DETR attaches one-to-many detection heads (ATSS, Faster R-CNN) to the encoder output
while training and drops them at inference, so the detector is unchanged. Here the auxiliary head is this package's
FCOS head and loss (:mod:`lit_tasks.models.detection.fcos`: GroupNorm towers, focal loss, GIoU, centerness, centre
sampling 1.5) on the encoder memory laid back out as its feature map: one level at the backbone's stride that
regresses every box size, its losses added with weight 1 (Co-DETR's lambda_1) as ``loss_cls_aux``,
``loss_box_aux``, ``loss_centerness_aux``. Not included: Co-DETR's customized positive queries (§3.3), which feed
the auxiliary heads' positives to the decoder as extra query groups.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_tasks.models.detection.fcos import FCOSCriterion, FCOSHead, FCOSOutput
from lit_tasks.ops.assigners import INF, grid_points
from lit_tasks.ops.box_ops import box_xyxy_to_cxcywh, distance2bbox

# One level that takes every object, whatever its size.
ANY_SIZE = ((-1.0, INF),)


class DenseAuxiliaryHead(nn.Module):
    """FCOS head on the encoder memory: ``forward(memory (B, S, d), (Hf, Wf))`` -> :class:`FCOSOutput` (one level).

    ``stride``: the input pixels per feature cell (the backbone's reduction: 32, or 16 with DC5).
    """

    def __init__(self, num_classes: int, d_model: int, stride: int, num_convs: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.head = FCOSHead(num_classes=num_classes, channels=d_model, num_convs=num_convs, num_levels=1)

    def forward(self, memory: Tensor, feature_size: tuple[int, int]) -> FCOSOutput:
        feature_map = memory.transpose(1, 2).unflatten(2, feature_size)  # (B, d, Hf, Wf)
        cls_logits, ltrb, centerness = self.head([feature_map])
        points, strides, levels = grid_points([tuple(feature_size)], [self.stride], memory.device)
        return FCOSOutput(cls_logits, ltrb, centerness, points, strides, levels)


def dense_auxiliary_criterion(num_classes: int) -> FCOSCriterion:
    """FCOS's losses for :class:`DenseAuxiliaryHead` (GIoU, centre sampling 1.5, one any-size level)."""
    return FCOSCriterion(num_classes=num_classes, regress_ranges=ANY_SIZE, center_sampling_radius=1.5)


@torch.no_grad()
def selected_anchors(out: FCOSOutput, image_sizes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The dense head's ``k`` best boxes per image as normalised (cx, cy, w, h) ``(B, k, 4)`` and their locations
    ``(B, k)``, no gradient: the decoder's anchor queries in query selection (Deformable DETR's two-stage variant
    §4.2, DINO's query selection).

    Score of a location: its best class probability; boxes are clipped to the image. Locations outside the image's
    own (h, w) are chosen only where it has none inside (an image smaller than one cell: its best location); an image
    with fewer locations inside than ``k`` repeats its best ones.
    """
    scores = out.cls_logits.float().sigmoid().amax(-1)  # (B, S)
    sizes = image_sizes.to(scores.device, torch.float32)  # (B, 2) h, w
    inside = (out.points[None, :, 0] < sizes[:, 1:]) & (out.points[None, :, 1] < sizes[:, :1])
    ranked = torch.where(inside, scores, scores - 2.0)  # every inside location first, each part by score
    order = ranked.topk(min(k, scores.shape[1]), dim=1).indices
    count = inside.sum(1).clamp(1, order.shape[1])  # (B,) the usable ones among them
    order = order.gather(1, torch.arange(k, device=order.device)[None] % count[:, None])
    ltrb = out.ltrb.float() * out.strides[None, :, None]
    boxes = distance2bbox(out.points[None].float(), ltrb)  # (B, S, 4) xyxy pixels (points broadcast)
    scale = sizes.flip(-1).repeat(1, 2)[:, None]  # (B, 1, 4): w, h, w, h
    boxes = torch.minimum(boxes.clamp(min=0), scale) / scale
    return box_xyxy_to_cxcywh(boxes.gather(1, order[..., None].expand(-1, -1, 4))), order
