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
    if "head.vfnet_cls.weight" in keys or any(k.startswith("head.") and "refine" in k for k in keys):
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
VFNET_CLASS_HEAD = ("head.vfnet_cls.weight", "head.vfnet_cls.bias")
MMDET_VFNET_RULES: list[Rule] = []


def convert_mmdet_vfnet(state_dict: Mapping[str, Tensor]) -> Converted:  # filled in below
    raise ValueError("mmdetection VFNet: not supported yet")
