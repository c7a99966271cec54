"""FCOS: Fully Convolutional One-Stage detection (Tian et al. 2019), with the "imprv" tricks.

Network = timm backbone (C3-C5) -> FPN (P3-P7) -> shared head. The tricks mmdetection and the FCOS repo
turn on are the defaults here (REFERENCE.md §3): GroupNorm head, centerness on the regression tower,
``norm_on_bbox`` (ReLU regression in units of the level stride), centre sampling radius 1.5, GIoU box
loss weighted by the centerness target. :func:`build_fcos` returns the detector trio
``(FCOS, FCOSCriterion, FCOSPostprocess)`` that ``DetectionTask`` drives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_tasks.losses.focal import sigmoid_focal_loss
from lit_tasks.losses.iou import box_loss as iou_loss_by_name
from lit_tasks.losses.reduction import loss_normaliser
from lit_tasks.models.backbone import FrozenBN, Normalize, build_backbone
from lit_tasks.models.fpn import FPN, flatten_levels
from lit_tasks.ops.assigners import FCOS_REGRESS_RANGES, centerness_target, fcos_targets, grid_points, pad_targets
from lit_tasks.ops.box_ops import distance2bbox
from lit_tasks.ops.dense_postprocess import PADDED_LOGIT, dense_detections
from lit_tasks.ops.images import group_same_sizes, maps_as_if_alone, padded_size


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Shared over levels: cls and reg towers (conv3x3-GN-ReLU x num_convs), per-level learnable scales.

    Outputs per location: C class logits (sigmoid, no background logit), 4 distances (l, t, r, b) in units
    of the level stride (ReLU(scale * x), "norm_on_bbox"), 1 centerness logit from the regression tower.
    """

    def __init__(self, *, num_classes: int, channels: int, num_convs: int = 4, num_levels: int = 5,
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        # GN(32) as the paper (8 channels a group at 256); narrow heads keep >= 2 channels a group, else a
        # 1x1 level (P7 of a small image) of a single image would normalise every value to 0 (torch refuses).
        groups = math.gcd(32, max(1, channels // 2))
        self.cls_tower = _tower(channels, num_convs, groups)
        self.reg_tower = _tower(channels, num_convs, groups)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_level(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level (B, C_in, H, W) -> class logits (B, C, H, W), ltrb (B, 4, H, W) in strides, centerness (B, 1, H, W)
        logits."""
        # The towers run in x's memory format: a channels_last FPN's NHWC maps stay NHWC (on CPU, torch 2.x, the
        # conv3x3-GN-ReLU towers' forward + backward are ~4 % faster so than converted to NCHW).
        cls_feat = self.cls_tower(x)
        reg_feat = self.reg_tower(x)
        ltrb = F.relu(self.scales[level] * self.bbox_pred(reg_feat))
        return self.cls_logits(cls_feat), ltrb, self.centerness(reg_feat)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels -> cls (B, P, C), ltrb (B, P, 4) in stride units, centerness logits (B, P)."""
        maps = [m for level, x in enumerate(features) for m in self.forward_level(x, level)]
        cls, ltrb, ctr = flatten_levels(maps, 3)
        return cls, ltrb, ctr.squeeze(-1)


@dataclass
class FCOSOutput:
    """Raw network outputs plus the geometry needed to decode them."""

    cls_logits: torch.Tensor  # (B, P, C)
    ltrb: torch.Tensor  # (B, P, 4), units of stride
    centerness: torch.Tensor  # (B, P) logits
    points: torch.Tensor  # (P, 2)
    strides: torch.Tensor  # (P,)
    levels: torch.Tensor  # (P,)
    image_points: torch.Tensor | None = None  # (B, P, 2) where an image's own points differ from the batch's


FCOS_POINTS = ("center", "torchvision")


def level_sizes_of(image_size: tuple[int, int], num_levels: int = 5) -> list[tuple[int, int]]:
    """Level sizes P3..P7 of an image padded to a multiple of 32: strides 8, 16, 32, then 3x3 stride-2 convs."""
    h, w = (int(v) for v in image_size)
    sizes = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    while len(sizes) < num_levels:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


def fcos_points(level_sizes: list[tuple[int, int]], strides: list[int], image_size: tuple[int, int],
                points: str = "center", device: torch.device | None = None,
                own_level_sizes: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, ...]:
    """The location of every cell of levels ``level_sizes`` (finest first) of a padded ``(H, W)`` batch.

    ``points="center"``: cell (x, y) of stride s sits at ``(x*s + s//2, y*s + s//2)`` (FCOS §3.1, mmdetection, the
    FCOS repo). ``"torchvision"``: torchvision's ``FCOS`` takes its anchor generator's anchor centres,
    ``(x * (W // w), y * (H // h))`` -- no half-stride offset, and the stride of a level is the padded image size
    divided by the level size, per axis: at P6 / P7 of a side that is not a multiple of 128 it is not 64 / 128
    (480 px: P7 has 4 rows, 480 // 4 = 120). The returned strides are the nominal ones either way (the unit of the
    l, t, r, b distances: torchvision's anchors are ``8 ... 128`` pixels wide whatever the shift).

    ``own_level_sizes``: the level sizes of one image padded alone to ``image_size`` when the grid is a larger
    batch's (``"torchvision"`` takes its per-level step from them).

    Returns:
        points (P, 2) xy pixels, strides (P,), level index (P,).
    """
    grid, point_strides, levels = grid_points(level_sizes, strides, device)
    if points == "center":
        return grid, point_strides, levels
    if points != "torchvision":
        raise ValueError(f"points must be one of {FCOS_POINTS}, got {points!r}")
    per_level = []
    for (h, w), (own_h, own_w) in zip(level_sizes, own_level_sizes or level_sizes):
        ys = torch.arange(h, device=device, dtype=torch.float32) * (int(image_size[0]) // own_h)
        xs = torch.arange(w, device=device, dtype=torch.float32) * (int(image_size[1]) // own_w)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        per_level.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1))
    return torch.cat(per_level), point_strides, levels


class FCOS(nn.Module):
    """Normalise -> backbone (C3-C5) -> FPN (P3-P7) -> FCOS head; ``forward(images, image_sizes)`` gives an :class:`FCOSOutput`.

    Images are ``(B, 3, H, W)`` in [0, 1] (ImageNet mean/std applied inside; the padding outside ``image_sizes``
    is zero after normalisation, as mmdet pads). Training runs the padded batch in one call, as mmdet trains. In
    evaluation (``eval()``, with ``image_sizes``) each image runs as if alone, padded to its own multiple of
    ``size_divisor`` (mmdet tests one image per GPU), one call per image on a CPU and per padded size elsewhere
    (:func:`lit_tasks.ops.images.group_same_sizes`): an image's features near its border then never depend on its
    batch-mates. Dense predictions cover the largest image's grid; locations beyond an image's own grid have class
    logit ``PADDED_LOGIT`` (probability 0, no loss). Without ``image_sizes`` every image fills the tensor and runs as
    given (what an exported graph sees). ``points`` places the
    locations (:func:`fcos_points`): ``"center"`` (ours, mmdetection) or ``"torchvision"`` (its published weights;
    there, as in torchvision, the P6 / P7 positions follow the padded batch's size).
    """

    strides = (8, 16, 32, 64, 128)
    size_divisor = 32  # mmdet's test-time Pad(size_divisor=32): the backbone's coarsest stride

    def __init__(self, *, num_classes: int, backbone: str = "resnet50", pretrained: bool = False,
                 fpn_channels: int = 256, num_convs: int = 4, frozen_stages: int = -1,
                 frozen_bn: FrozenBN = False, points: str = "center") -> None:
        super().__init__()
        if points not in FCOS_POINTS:
            raise ValueError(f"points must be one of {FCOS_POINTS}, got {points!r}")
        self.points = points
        self.normalize = Normalize()
        # C3, C4, C5: the last three stages (strides 8, 16, 32) of any timm feature extractor.
        self.backbone = build_backbone(backbone, pretrained=pretrained, out_indices=(-3, -2, -1),
                                       frozen_stages=frozen_stages, frozen_bn=frozen_bn)
        reductions = self.backbone.feature_info.reduction()
        if list(reductions) != [8, 16, 32]:
            raise ValueError(f"backbone {backbone!r}: FCOS needs stages at strides 8, 16, 32, got {reductions}")
        self.fpn = FPN(self.backbone.feature_info.channels(), fpn_channels, num_extra=2)
        self.head = FCOSHead(num_classes=num_classes, channels=fpn_channels, num_convs=num_convs,
                             num_levels=len(self.strides))
        self._grid_cache: dict = {}

    def grid(self, sizes: list[tuple[int, int]], device: torch.device,
             image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """Location grid for these level sizes of a padded ``image_size`` batch, cached (the same input size recurs
        every step)."""
        image_size = tuple(image_size) if image_size is not None else (sizes[0][0] * 8, sizes[0][1] * 8)
        key = (tuple(sizes), image_size, str(device))
        if key not in self._grid_cache:
            self._grid_cache = {key: fcos_points(sizes, list(self.strides), image_size, self.points, device)}
        return self._grid_cache[key]

    def level_maps(self, images: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """The head's maps ``[cls_0, ltrb_0, ctr_0, cls_1, ...]`` of a padded batch, levels P3..P7."""
        levels = self.fpn(self.backbone(self.normalize(images, image_sizes)))
        return [m for level, x in enumerate(levels) for m in self.head.forward_level(x, level)]

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None) -> FCOSOutput:
        if self.training or image_sizes is None:
            maps = self.level_maps(images, image_sizes)
        else:
            maps = maps_as_if_alone(self.level_maps, images, image_sizes, self.size_divisor,
                                    [PADDED_LOGIT, 0.0, PADDED_LOGIT] * len(self.strides),
                                    group=group_same_sizes(images.device))
        cls_logits, ltrb, centerness = flatten_levels(maps, 3)
        level_sizes = [tuple(m.shape[-2:]) for m in maps[::3]]
        points, strides, level_ids = self.grid(level_sizes, images.device, tuple(images.shape[-2:]))
        image_points = None
        if self.points == "torchvision" and not (self.training or image_sizes is None):
            # torchvision's steps follow the padded size: each image's are those of the image padded alone.
            own = [padded_size(size, self.size_divisor) for size in image_sizes]
            image_points = torch.stack([
                fcos_points(level_sizes, list(self.strides), size, self.points, images.device,
                            own_level_sizes=level_sizes_of(size, len(self.strides)))[0] for size in own])
        return FCOSOutput(cls_logits, ltrb, centerness.squeeze(-1), points, strides, level_ids, image_points)


class FCOSCriterion(nn.Module):
    """FCOS losses (REFERENCE.md §3.3), all in fp32: ``forward(outputs, targets)`` -> weighted ``loss_*`` dict.

    - cls: sigmoid focal loss over all locations / number of positives (mean over processes, min 1);
    - box: IoU-family loss on decoded boxes, each positive weighted by its centerness target, / the sum of
      centerness targets (mean over processes, min 1e-6);
    - centerness: BCE with logits / number of positives.

    Both normalisers are reduced before anything depends on whether this process has positives, so every
    process makes the same collective calls (a rank whose images have no object must not skip one: the other
    ranks would wait forever or pair the wrong buffers). In evaluation mode they stay local: evaluation
    loaders split samples unevenly across processes and must make no collective call.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        box_loss: str = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        regress_ranges: tuple[tuple[float, float], ...] = FCOS_REGRESS_RANGES,
        center_sampling_radius: float = 1.5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.box_loss = iou_loss_by_name(box_loss)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.regress_ranges = tuple(tuple(float(v) for v in r) for r in regress_ranges)
        self.center_sampling_radius = center_sampling_radius

    def forward(self, out: FCOSOutput, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, out.cls_logits.device)
        labels, ltrb_target = fcos_targets(
            out.points, out.strides, out.levels, gt_boxes, gt_labels, gt_valid, self.num_classes,
            self.center_sampling_radius, self.regress_ranges,
        )
        pos = labels < self.num_classes
        # norm_on_bbox: targets in units of the location's stride; IoU is scale and translation invariant,
        # so boxes decoded around the origin compare exactly as boxes around the point would.
        target_ltrb = ltrb_target[pos] / out.strides.expand_as(labels)[pos].unsqueeze(-1)
        ctr_target = centerness_target(target_ltrb)
        num_pos = loss_normaliser(pos.sum(), training=self.training, min_value=1.0)
        ctr_norm = loss_normaliser(ctr_target.sum(), training=self.training, min_value=1e-6)

        cls_logits = out.cls_logits.float()
        cls_target = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(cls_logits.dtype)
        loss_cls = sigmoid_focal_loss(cls_logits, cls_target, self.focal_alpha, self.focal_gamma,
                                      reduction="sum") / num_pos
        pred_ltrb = out.ltrb.float()[pos]
        ctr_logits = out.centerness.float()[pos]
        # With no positive the sums below are graph-connected zeros (mmdet: pred.sum()).
        origin = pred_ltrb.new_zeros((pred_ltrb.shape[0], 2))
        box_losses = self.box_loss(distance2bbox(origin, pred_ltrb), distance2bbox(origin, target_ltrb))
        loss_box = (box_losses * ctr_target).sum() / ctr_norm
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}


class FCOSPostprocess(nn.Module):
    """Decode detections per image (REFERENCE.md §3.4); ``forward(outputs, image_sizes)`` -> list of dicts.

    Per level: among the locations inside the image's own ``(h, w)``, keep (location, class) pairs whose raw class
    probability exceeds ``score_threshold``, the top ``pre_nms_top_k`` by cls * centerness (FCOS repo); decode and
    clip to the image; class-wise NMS; keep ``max_detections`` (the shared tail,
    :func:`lit_tasks.ops.dense_postprocess.dense_detections`). The reported score is sqrt(cls * centerness): the
    same ranking as mmdet's cls * centerness (so the same AP) on the probability scale the FCOS author recommends.
    ``score_threshold_on`` says which score the threshold applies to: ``"class"`` the raw class probability (ours),
    ``"joint"`` sqrt(cls * centerness) (torchvision's ``FCOS.postprocess_detections``).

    Returns per image ``{"boxes": (N, 4) xyxy in input pixels, "scores": (N,), "labels": (N,)}``.
    """

    def __init__(self, score_threshold: float = 0.05, pre_nms_top_k: int = 1000, nms_threshold: float = 0.6,
                 max_detections: int = 100, score_threshold_on: str = "class") -> None:
        super().__init__()
        if score_threshold_on not in ("class", "joint"):
            raise ValueError(f"score_threshold_on must be 'class' or 'joint', got {score_threshold_on!r}")
        self.score_threshold_on = score_threshold_on
        self.score_threshold, self.pre_nms_top_k = score_threshold, pre_nms_top_k
        self.nms_threshold, self.max_detections = nms_threshold, max_detections

    @torch.no_grad()
    def forward(self, out: FCOSOutput, image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        cls_prob = out.cls_logits.float().sigmoid()
        ctr_prob = out.centerness.float().sigmoid()
        joint = cls_prob * ctr_prob[..., None]
        thresholded = cls_prob if self.score_threshold_on == "class" else joint.sqrt()
        counts = torch.bincount(out.levels).tolist()  # levels are contiguous, finest first
        return [
            dense_detections(joint[i], thresholded[i] > self.score_threshold,
                             out.ltrb[i].float() * out.strides[:, None],
                             out.points if out.image_points is None else out.image_points[i], counts, size,
                             pre_nms_top_k=self.pre_nms_top_k, nms_threshold=self.nms_threshold,
                             max_detections=self.max_detections, top_k="pairs", score_transform=torch.sqrt)
            for i, size in enumerate(image_sizes)
        ]


def build_fcos(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    pretrained: bool = False,
    fpn_channels: int = 256,
    head_convs: int = 4,
    frozen_stages: int = -1,
    frozen_bn: FrozenBN = False,
    box_loss: str = "giou",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    regress_ranges: tuple[tuple[float, float], ...] = FCOS_REGRESS_RANGES,
    center_sampling_radius: float = 1.5,
    score_threshold: float = 0.05,
    pre_nms_top_k: int = 1000,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    points: str = "center",
    score_threshold_on: str = "class",
) -> tuple[FCOS, FCOSCriterion, FCOSPostprocess]:
    """The FCOS detector trio: network, criterion (losses with their settings) and post-processor.

    ``points`` (:func:`fcos_points`) and ``score_threshold_on`` (:class:`FCOSPostprocess`) reproduce torchvision's
    ``fcos_resnet50_fpn`` with ``"torchvision"`` / ``"joint"`` (and ``score_threshold=0.2``)."""
    model = FCOS(num_classes=num_classes, backbone=backbone, pretrained=pretrained, fpn_channels=fpn_channels,
                 num_convs=head_convs, frozen_stages=frozen_stages, frozen_bn=frozen_bn, points=points)
    criterion = FCOSCriterion(num_classes=num_classes, box_loss=box_loss, focal_alpha=focal_alpha,
                              focal_gamma=focal_gamma, regress_ranges=regress_ranges,
                              center_sampling_radius=center_sampling_radius)
    postprocess = FCOSPostprocess(score_threshold=score_threshold, pre_nms_top_k=pre_nms_top_k,
                                  nms_threshold=nms_threshold, max_detections=max_detections,
                                  score_threshold_on=score_threshold_on)
    return model, criterion, postprocess


# -- export (tools/export.py): the network up to its raw outputs, and back --------------------------------------------
FCOS_EXPORT_NAMES = ("class_logits", "box_ltrb", "centerness_logits")


def fcos_export_tensors(out: FCOSOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image-dependent raw outputs of an exported FCOS: class logits ``(B, P, C)``, distances ``(B, P, 4)`` (l, t,
    r, b in units of each location's stride) and centerness logits ``(B, P)``; P runs over levels P3..P7, each row by
    row. The location grid is fixed by the input size and rebuilt by :func:`fcos_output_from_export`."""
    return out.cls_logits, out.ltrb, out.centerness


def fcos_output_from_export(tensors: tuple[torch.Tensor, ...], image_size: tuple[int, int], model: FCOS) -> FCOSOutput:
    """An :class:`FCOSOutput` from the raw outputs of ``(H, W)`` images, for :class:`FCOSPostprocess`.

    Level l (stride s = 8, 16, ..., 128) has ``ceil(H / s) x ceil(W / s)`` locations: stride-2 3x3 convolutions with
    padding 1 round up at every halving, in the backbone and in the FPN's extra levels.
    """
    cls_logits, ltrb, centerness = tensors
    h, w = (int(v) for v in image_size)
    sizes = [(-(-h // s), -(-w // s)) for s in model.strides]
    points, strides, levels = fcos_points(sizes, list(model.strides), (h, w), getattr(model, "points", "center"),
                                          cls_logits.device)
    if points.shape[0] != cls_logits.shape[1]:
        raise ValueError(f"{cls_logits.shape[1]} locations for {h}x{w} images, but FCOS's grid has {points.shape[0]} "
                         f"({sizes}): were the outputs made at another input size?")
    return FCOSOutput(cls_logits, ltrb, centerness, points, strides, levels)
