"""Published detector weights onto our FCOS and VarifocalNet (DETR: :mod:`lit_tasks.models.detection.detr_convert`).

Layouts, recognised from the key names (:func:`convert_detection_state_dict`):

**torchvision** ``fcos_resnet50_fpn`` (``FCOS_ResNet50_FPN_Weights.COCO_V1``, ``fcos_resnet50_fpn_coco-99b0c9b7.pth``):

=========================================================  =================================================
torchvision                                                ours (:class:`~lit_tasks.models.detection.fcos.FCOS`)
=========================================================  =================================================
``backbone.body.{conv1,bn1,layerS.B.*}``                   ``backbone.*`` (timm's ResNet names are torchvision's)
``backbone.fpn.inner_blocks.i[.0].{weight,bias}``          ``fpn.lateral.i.*`` (``.0``: torchvision >= 0.13)
``backbone.fpn.layer_blocks.i[.0].*``                      ``fpn.output.i.*``
``backbone.fpn.extra_blocks.p6.*`` / ``p7.*``              ``fpn.extra.0.*`` / ``fpn.extra.1.*``
``head.classification_head.conv.{0,1,3,4,...}.*``          ``head.cls_tower.*`` (conv, GroupNorm, ReLU x 4)
``head.classification_head.cls_logits.*``                  ``head.cls_logits.*`` (class head: 91 rows = COCO ids)
``head.regression_head.conv.*``                            ``head.reg_tower.*``
``head.regression_head.bbox_reg.*``                        ``head.bbox_pred.*``
``head.regression_head.bbox_ctrness.*``                    ``head.centerness.*``
(none: torchvision has no per-level scale)                 ``head.scales`` = 1
=========================================================  =================================================

What torchvision computes otherwise, and the options that reproduce it: locations at ``x * stride`` without the
half-stride offset, with the stride taken as padded size // level size (``points="torchvision"``, set from the file);
evaluation with ``score_threshold=0.2`` on ``sqrt(cls x centerness)`` (``score_threshold_on="joint"``, recorded as
the reference's evaluation settings, not forced). Its transform (resize to 800 / 1333, ImageNet mean / std, zero
padding to a multiple of 32) is the DataModule's and :class:`~lit_tasks.models.backbone.Normalize`'s.

**mmdetection** VarifocalNet (``vfnet_r50_fpn_*``, ``vfnet_r101_fpn_*``): see :data:`MMDET_VFNET_RULES`.

**lit_tasks**: our own names (a state dict of :class:`FCOS` / :class:`VFNet`), taken as they are.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lit_tasks.models.published import Converted, Rule, read_converted, rename, resnet_name

TORCHVISION_FCOS_RULES: list[Rule] = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"fpn.output.\1."),
    (r"^backbone\.fpn\.extra_blocks\.p6\.", "fpn.extra.0."),
    (r"^backbone\.fpn\.extra_blocks\.p7\.", "fpn.extra.1."),
    (r"^head\.classification_head\.conv\.", "head.cls_tower."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_logits."),
    (r"^head\.regression_head\.conv\.", "head.reg_tower."),
    (r"^head\.regression_head\.bbox_reg\.", "head.bbox_pred."),
    (r"^head\.regression_head\.bbox_ctrness\.", "head.centerness."),
]
# torchvision's FCOS.postprocess_detections defaults (score_thresh, nms_thresh, detections_per_img, topk_candidates).
TORCHVISION_FCOS_EVAL = dict(score_threshold=0.2, score_threshold_on="joint", nms_threshold=0.6, max_detections=100,
                             pre_nms_top_k=1000)
FCOS_CLASS_HEAD = ("head.cls_logits.weight", "head.cls_logits.bias")
NUM_LEVELS = 5
# The 80 COCO category ids in id order: ``class_rows`` for a model whose classes are COCO's numbered 0..79 in id
# order (our COCO DataModule's labels) from a head indexed by category id (torchvision's 91 rows, DETR's 92 logits).
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                     58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                     88, 89, 90)


def detect_detection_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"torchvision_fcos"``, ``"mmdet_vfnet"``, ``"lit_tasks_fcos"``, ``"lit_tasks_vfnet"`` or ``"detr"``."""
    keys = set(state_dict)
    if "head.classification_head.cls_logits.weight" in keys and "head.regression_head.bbox_ctrness.weight" in keys:
        return "torchvision_fcos"
    if "bbox_head.vfnet_cls.weight" in keys:
        return "mmdet_vfnet"
    if "head.cls_logits.weight" in keys and "head.centerness.weight" in keys:
        return "lit_tasks_fcos"
    if "head.cls_logits.weight" in keys and "head.reg_refine.weight" in keys:
        return "lit_tasks_vfnet"
    from lit_tasks.models.detection.detr_convert import detect_layout

    try:
        detect_layout(state_dict)
        return "detr"
    except ValueError:
        pass
    raise ValueError(f"not a detector state dict of a known layout (torchvision fcos_resnet50_fpn, mmdetection "
                     f"VFNet, DETR, lit_tasks); first keys: {list(state_dict)[:5]}")


def _tower_convs(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    """Convolutions of a head tower (4-d weights under ``prefix``)."""
    return sum(1 for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 4)


def convert_torchvision_fcos(state_dict: Mapping[str, Tensor]) -> Converted:
    """torchvision ``FCOS`` state dict -> ours (table in the module docstring)."""
    sd = rename(state_dict, TORCHVISION_FCOS_RULES, "torchvision FCOS")
    backbone = resnet_name(sd, "backbone.")
    if backbone is None:
        raise ValueError("torchvision FCOS: the backbone is not a ResNet-18/34/50/101/152")
    sd["head.scales"] = torch.ones(NUM_LEVELS)  # torchvision has no per-level scale: ReLU(bbox_reg) as it is
    options = dict(model="fcos", backbone=backbone, fpn_channels=int(sd["fpn.lateral.0.weight"].shape[0]),
                   head_convs=_tower_convs(sd, "head.cls_tower."), points="torchvision")
    return Converted(sd, options, "torchvision fcos_resnet50_fpn", FCOS_CLASS_HEAD, dict(TORCHVISION_FCOS_EVAL))


def convert_detection_state_dict(state_dict: Mapping[str, Tensor]) -> Converted:
    """Any supported FCOS / VFNet layout -> :class:`Converted` (DETR files are read by ``detr_convert``)."""
    layout = detect_detection_layout(state_dict)
    if layout == "torchvision_fcos":
        return convert_torchvision_fcos(state_dict)
    if layout == "mmdet_vfnet":
        return convert_mmdet_vfnet(state_dict)
    if layout == "lit_tasks_fcos":
        return Converted(dict(state_dict), {"model": "fcos"}, "lit_tasks FCOS", FCOS_CLASS_HEAD)
    if layout == "lit_tasks_vfnet":
        return Converted(dict(state_dict), {"model": "vfnet"}, "lit_tasks VFNet", VFNET_CLASS_HEAD)
    raise ValueError("a DETR state dict: load it with model='detr' (lit_tasks.models.detection.detr_convert)")


def read_detection_weights(path: str) -> Converted:
    """A local FCOS / VFNet weights file (published or converted by ``tools/convert_weights.py``) as ours."""
    return read_converted(path, convert_detection_state_dict)


# -- mmdetection VarifocalNet -------------------------------------------------------------------------------------
VFNET_CLASS_HEAD = ("head.cls_logits.weight", "head.cls_logits.bias")
# mmdetection ``VFNet`` (``configs/vfnet/vfnet_r50_fpn_1x_coco.py`` and the R101 / multi-scale 2x variants without DCN):
# ``ResNet(style="pytorch")`` -> ``FPN(start_level=1, add_extra_convs="on_output", relu_before_extra_convs=True)`` ->
# ``VFNetHead(stacked_convs=3)``; ``ConvModule`` keeps its conv under ``.conv`` and its GroupNorm under ``.gn``.
MMDET_VFNET_RULES: list[Rule] = [
    (r"^backbone\.", "backbone."),  # pytorch-style ResNet: torchvision's (and timm's) names
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"fpn.lateral.\1."),
    (r"^neck\.fpn_convs\.([0-2])\.conv\.", r"fpn.output.\1."),
    (r"^neck\.fpn_convs\.3\.conv\.", "fpn.extra.0."),  # P6 on the P5 output
    (r"^neck\.fpn_convs\.4\.conv\.", "fpn.extra.1."),  # P7 on ReLU(P6)
    (r"^bbox_head\.cls_convs\.(\d+)\.conv\.", lambda m: f"head.cls_tower.{3 * int(m[1])}."),
    (r"^bbox_head\.cls_convs\.(\d+)\.gn\.", lambda m: f"head.cls_tower.{3 * int(m[1]) + 1}."),
    (r"^bbox_head\.reg_convs\.(\d+)\.conv\.", lambda m: f"head.reg_tower.{3 * int(m[1])}."),
    (r"^bbox_head\.reg_convs\.(\d+)\.gn\.", lambda m: f"head.reg_tower.{3 * int(m[1]) + 1}."),
    (r"^bbox_head\.vfnet_reg_conv\.conv\.", "head.reg_init_conv.0."),
    (r"^bbox_head\.vfnet_reg_conv\.gn\.", "head.reg_init_conv.1."),
    (r"^bbox_head\.vfnet_reg\.", "head.reg_init."),
    (r"^bbox_head\.vfnet_reg_refine_dconv\.", "head.reg_refine_dconv."),
    (r"^bbox_head\.vfnet_reg_refine\.", "head.reg_refine."),
    (r"^bbox_head\.vfnet_cls_dconv\.", "head.cls_dconv."),
    (r"^bbox_head\.vfnet_cls\.", "head.cls_logits."),
    # mmcv Scale modules (one scalar per level): stacked into head.scales / head.scales_refine below.
    (r"^bbox_head\.scales\.(\d+)\.scale$", lambda m: f"head.scales.{m[1]}"),
    (r"^bbox_head\.scales_refine\.(\d+)\.scale$", lambda m: f"head.scales_refine.{m[1]}"),
]
# mmdetection's VFNet test_cfg (nms_pre, score_thr, nms iou_threshold, max_per_img): ours already.
MMDET_VFNET_EVAL = dict(score_threshold=0.05, nms_threshold=0.6, max_detections=100, pre_nms_top_k=1000)
MMDET_INF = 1e8  # mmdet's INF, the upper end of the last regress range


def convert_mmdet_vfnet(state_dict: Mapping[str, Tensor]) -> Converted:
    """mmdetection ``VFNet`` state dict -> ours (:data:`MMDET_VFNET_RULES`).

    The options it records: the backbone (ResNet-50 / 101 from its blocks), ``fpn_channels``, ``head_convs``,
    ``use_atss=True`` (mmdet's locations without the half-stride offset, ``center_offset=0``) and mmdet's
    ``regress_ranges`` (the initial box of level l is ``exp(.) x`` its range's upper end: 64 ... 512, then 1024).
    Checkpoints with deformable convolutions in the backbone (``*_mdconv_c3-c5_*``) or on the last tower conv
    (``dcn_on_last_conv``) do not map: their extra keys are named in the error.
    """
    sd = rename(state_dict, MMDET_VFNET_RULES, "mmdetection VFNet")
    for name in ("scales", "scales_refine"):
        keys = sorted((k for k in sd if k.startswith(f"head.{name}.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if len(keys) != NUM_LEVELS:
            raise ValueError(f"mmdetection VFNet: {len(keys)} bbox_head.{name} entries, expected {NUM_LEVELS}")
        sd[f"head.{name}"] = torch.stack([sd.pop(k).reshape(()) for k in keys])
    backbone = resnet_name(sd, "backbone.")
    if backbone is None:
        raise ValueError("mmdetection VFNet: the backbone is not a ResNet-18/34/50/101/152")
    ranges = [[-1.0, 64.0], [64.0, 128.0], [128.0, 256.0], [256.0, 512.0], [512.0, MMDET_INF]]
    options = dict(model="vfnet", backbone=backbone, fpn_channels=int(sd["fpn.lateral.0.weight"].shape[0]),
                   head_convs=_tower_convs(sd, "head.cls_tower."), use_atss=True, regress_ranges=ranges)
    return Converted(sd, options, f"mmdetection vfnet_{backbone.replace('resnet', 'r')}_fpn", VFNET_CLASS_HEAD,
                     dict(MMDET_VFNET_EVAL))
