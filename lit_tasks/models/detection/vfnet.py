"""VarifocalNet (Zhang et al. 2021, "VarifocalNet: An IoU-aware Dense Object Detector"), as a detector trio.

Network = timm backbone (C3-C5) -> FPN (P3-P7) -> VFNet head (REFERENCE.md §4.2, mmdet ``VFNetHead``):

- GroupNorm towers (3 convs) for classification and regression, as FCOS but without centerness;
- an initial box per location: (l, t, r, b) = exp(scale * conv) * the level's regression denominator;
- the star-shaped box representation (§3.2 of the paper): a 3x3 deformable convolution whose nine
  sampling points are (-l, 0, r) x (-t, 0, b) of the initial box in feature cells, on both towers;
- the refined box = exp(scale' * conv(star features)) * the initial box (detached);
- the IoU-aware classification score (IACS) from the star features of the classification tower.

Trained with the varifocal loss on IACS targets (the IoU of the refined box), GIoU on both boxes weighted by
their IoU, and ATSS assignment over one 8 * stride square anchor per location (§4 of the paper).

``build_vfnet(...)`` returns ``(model, criterion, postprocess)``:
``model(images, image_sizes) -> VFNetOutput``, ``criterion(outputs, targets) -> {"loss_*": ...}``,
``postprocess(outputs, image_sizes) -> [{"boxes", "scores", "labels"}]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from lit_tasks.losses.iou import giou_loss
from lit_tasks.losses.reduction import loss_normaliser
from lit_tasks.losses.varifocal import varifocal_loss
from lit_tasks.models.backbone import FrozenBN, Normalize, build_backbone
from lit_tasks.models.fpn import FPN, flatten_levels
from lit_tasks.ops.assigners import (
    FCOS_REGRESS_RANGES,
    atss_targets,
    fcos_targets,
    grid_points,
    pad_targets,
    square_anchors,
)
from lit_tasks.ops.box_ops import aligned_box_iou, distance2bbox
from lit_tasks.ops.dense_postprocess import PADDED_LOGIT, dense_detections
from lit_tasks.ops.images import group_same_sizes, maps_as_if_alone
from lit_tasks.ops.star_conv import star_conv3x3

VFNET_STRIDES = (8, 16, 32, 64, 128)


def reg_denominators(regress_ranges: Sequence[Sequence[float]]) -> list[float]:
    """Scale of each level's initial box (mmdet ``bbox_norm_type="reg_denom"``): the upper end of the level's
    regress range, and twice the one below for the last level (whose upper end is "infinity").

    For FCOS's ranges: 64, 128, 256, 512, 1024 pixels.
    """
    denoms = [float(hi) for _, hi in regress_ranges]
    if len(denoms) > 1:
        denoms[-1] = denoms[-2] * 2
    return denoms


# Regular 3x3 grid of a convolution, (dy, dx) per tap in row-major order: deformable offsets are added to it.
_GRID_YX = torch.tensor([[dy, dx] for dy in (-1.0, 0.0, 1.0) for dx in (-1.0, 0.0, 1.0)]).view(1, 18, 1, 1)


def star_dcn_offsets(ltrb: Tensor) -> Tensor:
    """Offsets making a 3x3 deformable convolution sample the star of a box (VFNet §3.2, Fig. 3).

    Args:
        ltrb: (B, 4, H, W) distances (l, t, r, b) from each location to its box sides, in feature cells
            (pixels / stride).

    Returns:
        (B, 18, H, W) offsets in torchvision's ``deform_conv2d`` layout: (dy, dx) for each of the 9 taps,
        row-major. Tap (i, j) samples location + (y_i, x_j) with y in (-t, 0, b) and x in (-l, 0, r): the
        four corners, the four side midpoints' rows/columns and the centre of the box.
    """
    left, top, right, bottom = ltrb.unbind(1)
    zero = torch.zeros_like(left)
    ys, xs = (-top, zero, bottom), (-left, zero, right)
    star = torch.stack([v for y in ys for x in xs for v in (y, x)], dim=1)
    return star - _GRID_YX.to(star)


class DeformConv3x3(nn.Module):
    """VFNet's star-shaped 3x3 deformable convolution (Dai et al. 2017), stride 1, padding 1, no bias (mmcv
    ``DeformConv2d`` with :func:`star_dcn_offsets`).

    Two equal computations (tests/test_star_conv.py), chosen by device type:

    - :func:`lit_tasks.ops.star_conv.star_conv3x3`, a gather of the 25 integer neighbours of the 9 star points (one
      ``embedding_bag``, channels last) and one 1x1 convolution over 9C channels, on devices in
      :attr:`STAR_DEVICES` (a class default; an instance may override it, as benchmarks/detection_speed.py does to
      time both ways). On CPU (2-core AVX-512 machine, 2 threads, load average ~4, benchmarks/star_conv_speed.py:
      batch 2, 256 channels) it took 0.26x the time of ``deform_conv2d`` forward and 0.14x forward+backward at
      64x64 (P3 of a 512-px image; 1.6x / 1.8x an ordinary 3x3 convolution, against ~3x for the earlier
      ``grid_sample`` + NCHW 1x1 version), 0.22x / 0.12x at 32x32, 0.32x / 0.13x at 16x16, 0.61x / 0.23x at 8x8
      and 1.2x / 0.37x at 4x4 (a millisecond). The whole VFNet R-50 FPN step against FCOS's: see
      benchmarks/detection_speed.py (idle machine, load ~1, median of 5: training 1.19x, inference 1.15x; 3.3x /
      2.1x with ``deform_conv2d``). Not measured on a GPU yet, so CUDA keeps ``deform_conv2d``.
    - ``torchvision.ops.deform_conv2d`` elsewhere and whenever the module is traced or exported, so the exported
      graph keeps ONNX ``DeformConv`` (opset 19). It runs in the feature dtype, with offsets and weight cast to it
      (so fp16 works, mmdet#4172); bfloat16 features run in float32 because torchvision has no bfloat16 kernel.
    """

    STAR_DEVICES = frozenset({"cpu"})

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor, ltrb: Tensor) -> Tensor:
        """Features (B, C, H, W) and box distances (B, 4, H, W) in feature cells -> (B, O, H, W)."""
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        if x.device.type in self.STAR_DEVICES and not exporting:
            return star_conv3x3(x, ltrb, self.weight)
        return self.deform(x, star_dcn_offsets(ltrb))

    def deform(self, x: Tensor, offset: Tensor) -> Tensor:
        """``deform_conv2d`` with general offsets (B, 18, H, W)."""
        dtype = x.dtype
        compute = torch.float32 if dtype == torch.bfloat16 else dtype
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(x.to(compute), offset.to(compute), self.weight.to(compute), padding=(1, 1))
        return out.to(dtype)


def _conv_gn_relu(channels: int, groups: int) -> list[nn.Module]:
    # No conv bias before GroupNorm (mmdet ConvModule, conv_bias="auto").
    return [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels),
            nn.ReLU(inplace=True)]


class VFNetHead(nn.Module):
    """VFNet head, shared over levels (REFERENCE.md §4.2).

    Args:
        num_classes: foreground classes (sigmoid scores, no background logit).
        channels: FPN / head width.
        num_convs: convs per tower (3 in the paper).
        strides: stride of each level.
        reg_denoms: per-level scale of the initial box in pixels (:func:`reg_denominators`).
        gradient_mul: share of the gradient the star offsets pass back to the initial box (0.1).
        prior_prob: initial foreground probability of the classification bias (0.01).
    """

    def __init__(self, *, num_classes: int, channels: int, num_convs: int = 3, strides: Sequence[int] = VFNET_STRIDES,
                 reg_denoms: Sequence[float] = (64, 128, 256, 512, 1024), gradient_mul: float = 0.1,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        if len(reg_denoms) != len(strides):
            raise ValueError(f"VFNetHead: {len(strides)} levels but {len(reg_denoms)} regression denominators")
        self.strides = tuple(int(s) for s in strides)
        self.reg_denoms = tuple(float(d) for d in reg_denoms)
        self.gradient_mul = gradient_mul
        # GN(32) as the paper (8 channels a group at 256); narrow heads keep >= 2 channels a group (FCOS head).
        groups = math.gcd(32, max(1, channels // 2))
        self.cls_tower = nn.Sequential(*[m for _ in range(num_convs) for m in _conv_gn_relu(channels, groups)])
        self.reg_tower = nn.Sequential(*[m for _ in range(num_convs) for m in _conv_gn_relu(channels, groups)])
        self.reg_init_conv = nn.Sequential(*_conv_gn_relu(channels, groups))
        self.reg_init = nn.Conv2d(channels, 4, 3, padding=1)
        self.reg_refine_dconv = DeformConv3x3(channels, channels)
        self.reg_refine = nn.Conv2d(channels, 4, 3, padding=1)
        self.cls_dconv = DeformConv3x3(channels, channels)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        self.scales_refine = nn.Parameter(torch.ones(len(self.strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """One level (B, C_in, H, W) -> cls logits (B, C, H, W), initial and refined ltrb (B, 4, H, W) pixels."""
        x = x.contiguous()  # a channels_last FPN hands over NHWC maps; GN and deform_conv2d want NCHW
        cls_feat = self.cls_tower(x)
        reg_feat = self.reg_tower(x)
        # exp in float32: a bf16/fp16 exponent loses the box's digits (mmdet also calls .float() here).
        ltrb_init = (self.scales[level] * self.reg_init(self.reg_init_conv(reg_feat)).float()).exp()
        ltrb_init = ltrb_init * self.reg_denoms[level]
        # The star offsets pass only gradient_mul of their gradient back to the initial box (mmdet).
        ltrb_mixed = (1 - self.gradient_mul) * ltrb_init.detach() + self.gradient_mul * ltrb_init
        star = ltrb_mixed / self.strides[level]
        reg_feat = F.relu(self.reg_refine_dconv(reg_feat, star))
        ltrb_refine = (self.scales_refine[level] * self.reg_refine(reg_feat).float()).exp() * ltrb_init.detach()
        cls_feat = F.relu(self.cls_dconv(cls_feat, star))
        return self.cls_logits(cls_feat), ltrb_init, ltrb_refine

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Levels finest first -> cls logits (B, P, C), initial ltrb (B, P, 4), refined ltrb (B, P, 4) pixels."""
        if len(features) != len(self.strides):
            raise ValueError(f"VFNetHead: {len(self.strides)} levels expected, got {len(features)} feature maps")
        cls, ltrb_init, ltrb_refine = flatten_levels(
            [m for level, x in enumerate(features) for m in self.forward_level(x, level)], 3)
        return cls, ltrb_init, ltrb_refine


@dataclass
class VFNetOutput:
    """Raw VFNet outputs for a batch, with the location geometry needed to decode them.

    P = locations of all levels, finest first, row-major within a level.
    """

    cls_logits: Tensor  # (B, P, C) IoU-aware classification logits
    ltrb_init: Tensor  # (B, P, 4) initial box distances (l, t, r, b), pixels, float32
    ltrb_refine: Tensor  # (B, P, 4) refined box distances, pixels, float32
    points: Tensor  # (P, 2) location xy, pixels
    strides: Tensor  # (P,)
    levels: Tensor  # (P,) level index
    level_sizes: list[tuple[int, int]]  # (h, w) of each level's map
    image_sizes: list[tuple[int, int]]  # unpadded (h, w) of each image


def _as_sizes(image_sizes, batch: int, full: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """``image_sizes`` as (h, w) ints, one per image; None = every image fills the ``full`` batch size."""
    if image_sizes is None and full is not None:
        return [full] * batch
    sizes = [(int(h), int(w)) for h, w in image_sizes]
    if len(sizes) != batch:
        raise ValueError(f"VFNet: {batch} images but {len(sizes)} image_sizes")
    return sizes


class VFNet(nn.Module):
    """Normalize -> timm backbone (C3-C5) -> FPN (P3-P7) -> :class:`VFNetHead`.

    ``forward(images, image_sizes)``: images (B, 3, H, W) float in [0, 1], zero-padded bottom/right;
    image_sizes the unpadded (h, w) per image. Returns a :class:`VFNetOutput`.

    Locations of a level with stride s sit at (x*s + c*s, y*s + c*s) with ``center_offset`` c: 0 for ATSS, as
    mmdet's VFNet (its anchor generator's ``center_offset=0``; it is also where a ResNet's stride-s cell is
    centred), 0.5 (FCOS's s//2) with FCOS targets.

    Training runs the padded batch in one call, as mmdet trains. In evaluation (``eval()``, with ``image_sizes``)
    each image runs as if alone, padded to its own multiple of ``size_divisor`` (mmdet tests one image per GPU),
    one call per image on a CPU and per padded size elsewhere (:func:`lit_tasks.ops.images.group_same_sizes`); the
    outputs cover the largest image's grid, and locations beyond an image's own grid have class logit
    ``PADDED_LOGIT`` (probability 0, no loss) and zero distances. Without ``image_sizes`` every image fills the
    tensor and runs as given (what an exported graph sees).
    """

    size_divisor = 32  # mmdet's test-time Pad(size_divisor=32): the backbone's coarsest stride

    def __init__(self, *, num_classes: int, backbone: str = "resnet50", pretrained: bool = False,
                 fpn_channels: int = 256, head_convs: int = 3,
                 regress_ranges: Sequence[Sequence[float]] = FCOS_REGRESS_RANGES, center_offset: float = 0.0,
                 frozen_stages: int = -1, frozen_bn: FrozenBN = False) -> None:
        super().__init__()
        self.normalize = Normalize()
        # C3, C4, C5: the last three stages (strides 8, 16, 32) of any timm feature extractor.
        self.backbone = build_backbone(backbone, pretrained=pretrained, out_indices=(-3, -2, -1),
                                       frozen_stages=frozen_stages, frozen_bn=frozen_bn)
        reductions = list(self.backbone.feature_info.reduction())
        if reductions != [8, 16, 32]:
            raise ValueError(f"backbone {backbone!r}: VFNet needs stages at strides 8, 16, 32, got {reductions}")
        self.fpn = FPN(self.backbone.feature_info.channels(), fpn_channels, num_extra=2)
        self.head = VFNetHead(num_classes=num_classes, channels=fpn_channels, num_convs=head_convs,
                              strides=VFNET_STRIDES, reg_denoms=reg_denominators(regress_ranges))
        self.center_offset = float(center_offset)
        self._grid_cache: dict = {}

    def grid(self, sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Locations (P, 2), strides (P,), levels (P,) for these level sizes, cached (sizes recur every step)."""
        key = (tuple(sizes), str(device))
        if key not in self._grid_cache:
            points, strides, levels = grid_points(sizes, list(VFNET_STRIDES), device)
            points = points - (strides // 2)[:, None] + strides[:, None] * self.center_offset
            self._grid_cache = {key: (points, strides, levels)}
        return self._grid_cache[key]

    def level_maps(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[Tensor]:
        """The head's maps ``[cls_0, ltrb_init_0, ltrb_refine_0, cls_1, ...]`` of a padded batch, levels P3..P7."""
        levels = self.fpn(self.backbone(self.normalize(images, image_sizes)))
        return [m for level, x in enumerate(levels) for m in self.head.forward_level(x, level)]

    def forward(self, images: Tensor, image_sizes: Sequence[Sequence[int]] | None = None) -> VFNetOutput:
        sizes = _as_sizes(image_sizes, images.shape[0], tuple(images.shape[-2:]))
        if self.training or image_sizes is None:
            maps = self.level_maps(images, None if image_sizes is None else sizes)
        else:
            maps = maps_as_if_alone(self.level_maps, images, sizes, self.size_divisor,
                                    [PADDED_LOGIT, 0.0, 0.0] * len(VFNET_STRIDES),
                                    group=group_same_sizes(images.device))
        cls_logits, ltrb_init, ltrb_refine = flatten_levels(maps, 3)
        level_sizes = [tuple(m.shape[-2:]) for m in maps[::3]]
        points, strides, level_ids = self.grid(level_sizes, images.device)
        return VFNetOutput(cls_logits, ltrb_init, ltrb_refine, points, strides, level_ids, level_sizes, sizes)


class VFNetCriterion(nn.Module):
    """VFNet losses (REFERENCE.md §4.1-4.2, mmdet ``VFNetHead.loss``), in float32.

    - ``loss_cls``: varifocal loss over every location and class against the IACS target q (the IoU of the
      refined box with its ground truth at the positive's class, 0 elsewhere) / the number of positives;
    - ``loss_box``: GIoU loss of the initial boxes, each positive weighted by its IoU with the ground truth
      (detached, >= 1e-6), / the sum of those weights;
    - ``loss_box_refine``: the same for the refined boxes.

    Normalisers are means over processes in training (the DDP gradient average then gives the loss of the
    union of all batches), clamped at 1 as mmdet; every rank reaches the one all-reduce whatever its data.
    In evaluation nothing is all-reduced: evaluation ranks may run different numbers of batches.
    ``num_pos`` (the positive count normaliser, not a loss) is returned for logging.

    Args:
        num_classes: foreground classes.
        use_atss: ATSS assignment (paper); False: FCOS targets (regress ranges, centre sampling).
        topk: ATSS candidates per level and box; anchor_scale: ATSS anchor side in strides.
        regress_ranges, center_sampling_radius: FCOS targets only; radius 0 (default): no centre sampling, as mmdet's
            VFNetHead (``center_sampling=False``, its default and vfnet_r50_fpn_1x_coco.py's).
        vfl_alpha, vfl_gamma: varifocal loss parameters; loss_*_weight: the weights of the three losses.
    """

    def __init__(self, *, num_classes: int, use_atss: bool = True, topk: int = 9, anchor_scale: float = 8.0,
                 regress_ranges: Sequence[Sequence[float]] = FCOS_REGRESS_RANGES,
                 center_sampling_radius: float = 0.0, vfl_alpha: float = 0.75, vfl_gamma: float = 2.0,
                 loss_cls_weight: float = 1.0, loss_box_weight: float = 1.5,
                 loss_box_refine_weight: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.use_atss = use_atss
        self.topk = topk
        self.anchor_scale = anchor_scale
        self.regress_ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)
        self.center_sampling_radius = center_sampling_radius
        self.vfl_alpha, self.vfl_gamma = vfl_alpha, vfl_gamma
        self.weights = {"loss_cls": loss_cls_weight, "loss_box": loss_box_weight,
                        "loss_box_refine": loss_box_refine_weight}

    def assign(self, out: VFNetOutput, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Labels (B, P) (``num_classes`` = background) and assigned ground-truth boxes (B, P, 4) xyxy."""
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, out.points.device)
        bad = (gt_labels < 0) | (gt_labels >= self.num_classes)  # padding has label 0
        if bad.any():  # one device sync per step for a clear error instead of a wrong one-hot
            i = int(bad.any(1).nonzero()[0])
            raise ValueError(f"VFNet criterion: image {i} of the batch has labels {targets[i]['labels'].tolist()}, "
                             f"expected values in [0, {self.num_classes})")
        if self.use_atss:
            anchors = square_anchors(out.points, out.strides, self.anchor_scale)
            # Anchors centred in an image's padding are no candidates (mmdet's valid flags, here from the
            # unpadded size, so an image's assignment does not depend on what it is batched with).
            h, w = torch.tensor(out.image_sizes, device=out.points.device, dtype=out.points.dtype).unbind(1)
            valid = (out.points[None, :, 0] < w[:, None]) & (out.points[None, :, 1] < h[:, None])
            counts = [h_ * w_ for h_, w_ in out.level_sizes]
            return atss_targets(anchors, counts, gt_boxes, gt_labels, gt_valid, self.num_classes, self.topk, valid)
        labels, ltrb = fcos_targets(out.points, out.strides, out.levels, gt_boxes, gt_labels, gt_valid,
                                    self.num_classes, self.center_sampling_radius, self.regress_ranges)
        return labels, distance2bbox(out.points, ltrb)

    def forward(self, out: VFNetOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if len(targets) != out.cls_logits.shape[0]:
            raise ValueError(f"VFNet criterion: {out.cls_logits.shape[0]} images but {len(targets)} targets")
        with torch.autocast(out.cls_logits.device.type, enabled=False):
            return self._losses(out, targets)

    def _losses(self, out: VFNetOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        with torch.no_grad():
            labels, gt_boxes = self.assign(out, targets)
        pos = labels < self.num_classes  # (B, P)
        batch_idx, point_idx = pos.nonzero(as_tuple=True)
        points = out.points[point_idx]
        target = gt_boxes[batch_idx, point_idx]
        box_init = distance2bbox(points, out.ltrb_init[batch_idx, point_idx].float())
        box_refine = distance2bbox(points, out.ltrb_refine[batch_idx, point_idx].float())
        iou_init = aligned_box_iou(box_init.detach(), target).clamp(min=1e-6)
        iou_refine = aligned_box_iou(box_refine.detach(), target).clamp(min=1e-6)

        # All normalisers in one collective, before anything depends on this rank's data.
        norms = loss_normaliser(torch.stack((pos.sum().float(), iou_init.sum(), iou_refine.sum())),
                                training=self.training)
        num_pos, weight_init, weight_refine = norms.clamp(min=1.0).unbind()

        cls_logits = out.cls_logits.float()
        cls_target = torch.zeros_like(cls_logits)
        cls_target[batch_idx, point_idx, labels[batch_idx, point_idx]] = iou_refine
        loss_cls = varifocal_loss(cls_logits, cls_target, self.vfl_alpha, self.vfl_gamma, reduction="sum") / num_pos
        # With no positive these sums are empty: zeros that still reach every parameter of the box branches.
        loss_box = (giou_loss(box_init, target) * iou_init).sum() / weight_init
        loss_box_refine = (giou_loss(box_refine, target) * iou_refine).sum() / weight_refine
        losses = {"loss_cls": loss_cls, "loss_box": loss_box, "loss_box_refine": loss_box_refine}
        losses = {k: v * self.weights[k] for k, v in losses.items()}
        losses["num_pos"] = norms[0]
        return losses


class VFNetPostprocess(nn.Module):
    """Detections per image from :class:`VFNetOutput` (REFERENCE.md §4.2, mmdet ``VFNetHead.get_bboxes``).

    Per level: sigmoid scores (no centerness), the ``pre_nms_top_k`` locations inside the image's own ``(h, w)`` of
    highest maximum class score; every (location, class) pair of those with score > ``score_threshold``; refined
    boxes decoded and clipped to the image. Then class-wise NMS at ``nms_threshold`` over all levels and the
    ``max_detections`` best (the shared tail, :func:`lit_tasks.ops.dense_postprocess.dense_detections`).
    """

    def __init__(self, score_threshold: float = 0.05, pre_nms_top_k: int = 1000, nms_threshold: float = 0.6,
                 max_detections: int = 100) -> None:
        super().__init__()
        self.score_threshold = score_threshold
        self.pre_nms_top_k = pre_nms_top_k
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections

    @torch.no_grad()
    def forward(self, out: VFNetOutput, image_sizes: Sequence[Sequence[int]]) -> list[dict[str, Tensor]]:
        """Returns per image ``{"boxes": (N, 4) xyxy input pixels, "scores": (N,), "labels": (N,) int64}``."""
        sizes = _as_sizes(image_sizes, out.cls_logits.shape[0])
        scores = out.cls_logits.float().sigmoid()
        counts = [h * w for h, w in out.level_sizes]
        return [
            dense_detections(scores[i], scores[i] > self.score_threshold, out.ltrb_refine[i].float(), out.points,
                             counts, size, pre_nms_top_k=self.pre_nms_top_k, nms_threshold=self.nms_threshold,
                             max_detections=self.max_detections, top_k="locations")
            for i, size in enumerate(sizes)
        ]


def build_vfnet(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    pretrained: bool = False,
    fpn_channels: int = 256,
    head_convs: int = 3,
    use_atss: bool = True,
    regress_ranges: Sequence[Sequence[float]] | None = None,
    center_sampling_radius: float = 0.0,
    vfl_alpha: float = 0.75,
    vfl_gamma: float = 2.0,
    loss_cls_weight: float = 1.0,
    loss_box_weight: float = 1.5,
    loss_box_refine_weight: float = 2.0,
    score_threshold: float = 0.05,
    pre_nms_top_k: int = 1000,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    frozen_stages: int = -1,
    frozen_bn: FrozenBN = False,
) -> tuple[VFNet, VFNetCriterion, VFNetPostprocess]:
    """VarifocalNet as ``(model, criterion, postprocess)`` with the paper's defaults (vfnet_r50_fpn_1x_coco).

    Args:
        num_classes: foreground classes (no background class).
        backbone, pretrained, frozen_stages, frozen_bn: see :func:`lit_tasks.models.backbone.build_backbone`.
        fpn_channels: FPN and head width (256).
        head_convs: convs per head tower (3).
        use_atss: ATSS assignment with 8*stride anchors (paper); False: FCOS targets.
        regress_ranges: per-level (lo, hi) of max(l, t, r, b); they set the initial boxes' scales (always)
            and the FCOS targets (``use_atss=False``). None: FCOS's (-1, 64), ..., (512, inf).
        center_sampling_radius: FCOS targets only (0: none, mmdet's ``center_sampling=False``).
        vfl_alpha, vfl_gamma, loss_*_weight: see :class:`VFNetCriterion`.
        score_threshold, pre_nms_top_k, nms_threshold, max_detections: see :class:`VFNetPostprocess`.
    """
    if num_classes < 1:
        raise ValueError(f"build_vfnet: num_classes must be >= 1, got {num_classes}")
    ranges = FCOS_REGRESS_RANGES if regress_ranges is None else tuple(tuple(r) for r in regress_ranges)
    if len(ranges) != len(VFNET_STRIDES) or any(len(r) != 2 for r in ranges):
        raise ValueError(f"build_vfnet: regress_ranges needs {len(VFNET_STRIDES)} (lo, hi) pairs (P3-P7), got "
                         f"{regress_ranges}")
    model = VFNet(num_classes=num_classes, backbone=backbone, pretrained=pretrained, fpn_channels=fpn_channels,
                  head_convs=head_convs, regress_ranges=ranges, center_offset=0.0 if use_atss else 0.5,
                  frozen_stages=frozen_stages, frozen_bn=frozen_bn)
    criterion = VFNetCriterion(num_classes=num_classes, use_atss=use_atss, regress_ranges=ranges,
                               center_sampling_radius=center_sampling_radius, vfl_alpha=vfl_alpha,
                               vfl_gamma=vfl_gamma, loss_cls_weight=loss_cls_weight, loss_box_weight=loss_box_weight,
                               loss_box_refine_weight=loss_box_refine_weight)
    postprocess = VFNetPostprocess(score_threshold=score_threshold, pre_nms_top_k=pre_nms_top_k,
                                   nms_threshold=nms_threshold, max_detections=max_detections)
    return model, criterion, postprocess


# -- export (tools/export.py): the network up to its raw outputs, and back --------------------------------------------
VFNET_EXPORT_NAMES = ("class_logits", "box_ltrb")


def vfnet_export_tensors(out: VFNetOutput) -> tuple[Tensor, Tensor]:
    """The raw outputs an exported VFNet returns: IoU-aware class logits ``(B, P, C)`` and the refined box distances
    ``(B, P, 4)`` (l, t, r, b in pixels; the initial boxes only feed the refinement and the loss). P runs over levels
    P3..P7, each row by row; :func:`vfnet_output_from_export` rebuilds the location grid from the input size."""
    return out.cls_logits, out.ltrb_refine


def vfnet_output_from_export(tensors: tuple[Tensor, ...], image_size: tuple[int, int], model: VFNet) -> VFNetOutput:
    """A :class:`VFNetOutput` from the raw outputs of ``(H, W)`` images, for :class:`VFNetPostprocess` (level sizes
    ``ceil(H / s) x ceil(W / s)`` as FCOS's)."""
    cls_logits, ltrb = tensors
    h, w = (int(v) for v in image_size)
    sizes = [(-(-h // s), -(-w // s)) for s in VFNET_STRIDES]
    points, strides, levels = model.grid(sizes, cls_logits.device)
    if points.shape[0] != cls_logits.shape[1]:
        raise ValueError(f"{cls_logits.shape[1]} locations for {h}x{w} images, but VFNet's grid has "
                         f"{points.shape[0]} ({sizes}): were the outputs made at another input size?")
    return VFNetOutput(cls_logits, ltrb, ltrb, points, strides, levels, sizes, [(h, w)] * cls_logits.shape[0])
