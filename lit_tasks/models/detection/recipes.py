"""Each detector paper's training recipe, the values :class:`~lit_tasks.detection.DetectionTask` takes for its options
left at None (optimizer, LR, warm-up, backbone LR ratio, BN freezing, centre sampling), and its parameter groups.

A new detector adds its entry to both tables, citing its reference's configuration.
"""

from __future__ import annotations

from typing import Any

from lit_tasks.param_groups import ParamGroupRules

# Each paper's recipe: the value of an option left at None (see the DetectionTask docstring). ``frozen_bn``: with
# pretrained weights (from scratch: False). mmdet lines: configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py (FCOS,
# its imprv child fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco.py L51 warmup='linear') and
# configs/vfnet/vfnet_r50_fpn_1x_coco.py, mmdet 2.x.
RECIPES: dict[str, dict[str, Any]] = {
    # SGD lr 0.01 (L95-96), linear warm-up from 1/3 over 500 iterations (L103-104 + imprv L51), caffe ResNet with
    # BN requires_grad=False + norm_eval (L14-15): frozen BN; centre sampling radius 1.5 (mmdet's default).
    "fcos": dict(lr=0.01, warmup_steps=500, warmup_ratio=1 / 3, backbone_lr_ratio=1.0, optimizer="sgd",
                 frozen_bn=True, center_sampling_radius=1.5),
    # SGD lr 0.01 (L97-98), linear warm-up from 0.1 (L103-105), BN requires_grad=True + norm_eval (L14-15): frozen
    # statistics, trained affine; center_sampling=False (L33) for the FCOS-target fallback.
    "vfnet": dict(lr=0.01, warmup_steps=500, warmup_ratio=0.1, backbone_lr_ratio=1.0, optimizer="sgd",
                  frozen_bn="statistics", center_sampling_radius=0.0),
    # detr main.py: AdamW lr 1e-4, lr_backbone 1e-5, no warm-up; FrozenBatchNorm2d backbone.
    "detr": dict(lr=1e-4, warmup_steps=0, warmup_ratio=None, backbone_lr_ratio=0.1, optimizer="adamw",
                 frozen_bn=True, center_sampling_radius=0.0),
}
# Each recipe's parameter groups. mmdet FCOS and VFNet: ``paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.)``
# (fcos_r50_caffe_fpn_gn-head_1x_coco.py L95-96, vfnet_r50_fpn_1x_coco.py L97-98): every conv bias at 2x the LR
# without weight decay; norm layers, per-level scales and weights at the LR with decay. DETR (main.py L133-141 of
# facebookresearch/detr fb60557: ``param_dicts``, ``torch.optim.AdamW(param_dicts, lr=args.lr,
# weight_decay=args.weight_decay)``): every parameter decays; the backbone at ``backbone_lr_ratio``.
PARAM_GROUP_RULES: dict[str, ParamGroupRules] = {
    "fcos": ParamGroupRules(bias_lr_mult=2.0, bias_decay_mult=0.0),
    "vfnet": ParamGroupRules(bias_lr_mult=2.0, bias_decay_mult=0.0),
    "detr": ParamGroupRules(),
}
