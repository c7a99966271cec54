"""Published RLE weights onto our :class:`~lit_tasks.models.pose.rle.RLERegressor` and the loss's RealNVP flow.

The converted state dict covers two modules: ``model.*`` (the regressor, ``PoseTask.model``) and ``flow.*`` (the
learned error density, ``PoseTask.criterion.flow``: needed to fine-tune with the RLE loss, never at inference).
Layouts, recognised from the key names (:func:`convert_pose_state_dict`):

**Official** (Jeff-sjtu/res-loglikelihood-regression ``RegressFlow``, e.g. ``coco-laplace-rle.pth``, saved as
``model.state_dict()``):

======================================  ===========================================================================
official                                ours
======================================  ===========================================================================
``preact.{conv1,bn1,layerS.B.*}``       ``model.backbone.*`` (its ResNet has torchvision's names)
``fc_coord.linear.{weight,bias}``       ``model.fc_coord.linear.*`` (``Linear(norm=True)``: ``coord_norm=True``)
``fc_sigma.linear.{weight,bias}``       ``model.fc_sigma.linear.*``
``flow.mask``, ``flow.{s,t}.i.j.*``     ``flow.*`` (the same RealNVP: 6 couplings, Linear 2-64-64-2)
======================================  ===========================================================================

The official code feeds the RGB crop in [0, 1] minus (0.406, 0.457, 0.480), without dividing by a standard deviation:
the file sets ``input_normalization="rle"``. Its ``NUM_FC_FILTERS: [-1]`` head has no hidden layer (ours); a file
with hidden ``fcs.*`` layers is reported as unmatched.

**mmpose** RLE (``deeppose_res{50,101,152}_coco_256x192_rle-*.pth``: 0.x names ``keypoint_head.*`` / ``.loss.``,
1.x names ``head.*`` / ``.loss_module.``):

=================================================  ================================================================
mmpose                                             ours
=================================================  ================================================================
``backbone.*`` (ResNet, torchvision's names)       ``model.backbone.*``
``keypoint_head.fc.weight`` ``(4K, C)``            rows ``4k, 4k+1`` -> ``model.fc_coord.linear.weight`` (x, y),
                                                   rows ``4k+2, 4k+3`` -> ``model.fc_sigma.linear.weight``
``keypoint_head.fc.bias``                          the same rows; the coordinate bias minus 0.5: mmpose's
                                                   coordinates are ``x / W`` in [0, 1], ours ``x / W - 0.5``
``...loss.flow_model.{mask,s,t}``                  ``flow.*``
``...loss.flow_model.{loc,cov}``                   (checked to be N(0, I): ours writes the standard normal out)
=================================================  ================================================================

mmpose's head has no feature norm (``coord_norm=False``) and ImageNet normalisation (``input_normalization=
"imagenet"``). One difference is not reproduced: mmpose's decoder scores a keypoint with ``1 - mean(sigma)`` of the
raw, pre-sigmoid sigma output (its loss applies the sigmoid); ours with the sigmoid, as the official code. Keypoint
positions are the same; instance scores (hence the COCO AP ranking) can differ slightly.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lit_tasks.models.published import Converted, Rule, read_converted, rename, resnet_name

OFFICIAL_RULES: list[Rule] = [
    (r"^preact\.", "model.backbone."),
    (r"^fc_coord\.linear\.", "model.fc_coord.linear."),
    (r"^fc_sigma\.linear\.", "model.fc_sigma.linear."),
    (r"^flow\.", "flow."),
]
MMPOSE_RULES: list[Rule] = [
    (r"^backbone\.", "model.backbone."),
    (r"^(?:keypoint_head|head)\.fc\.", "mmpose_fc."),  # split into the coordinate and sigma rows below
    (r"^(?:keypoint_head|head)\.(?:loss|loss_module)\.flow_model\.(loc|cov)$", r"mmpose_prior.\1"),
    (r"^(?:keypoint_head|head)\.(?:loss|loss_module)\.flow_model\.", "flow."),
]
CLASS_HEAD: tuple[str, ...] = ()  # keypoints are not classes: K comes from the data and must be the file's


def detect_pose_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"rle_official"``, ``"mmpose"`` or ``"lit_tasks"``."""
    keys = set(state_dict)
    if "fc_coord.linear.weight" in keys and any(k.startswith("preact.") for k in keys):
        return "rle_official"
    if {"keypoint_head.fc.weight", "head.fc.weight"} & keys and any(k.startswith("backbone.") for k in keys):
        return "mmpose"
    if "model.fc_coord.linear.weight" in keys:
        return "lit_tasks"
    raise ValueError(f"not an RLE state dict of a known layout (official RegressFlow, mmpose RLE, lit_tasks); first "
                     f"keys: {list(state_dict)[:5]}")


def convert_official(state_dict: Mapping[str, Tensor]) -> Converted:
    sd = rename(state_dict, OFFICIAL_RULES, "official RLE")
    return Converted(sd, _options(sd, coord_norm=True, input_normalization="rle"), "official RLE RegressFlow")


def convert_mmpose(state_dict: Mapping[str, Tensor]) -> Converted:
    sd = rename(state_dict, MMPOSE_RULES, "mmpose RLE")
    weight, bias = sd.pop("mmpose_fc.weight"), sd.pop("mmpose_fc.bias")
    if weight.shape[0] % 4:
        raise ValueError(f"mmpose RLE: fc has {weight.shape[0]} outputs, not 4 per keypoint (x, y, sigma_x, sigma_y)")
    k = weight.shape[0] // 4
    coord_rows = torch.arange(4 * k).view(k, 4)[:, :2].reshape(-1)
    sigma_rows = torch.arange(4 * k).view(k, 4)[:, 2:].reshape(-1)
    sd["model.fc_coord.linear.weight"] = weight[coord_rows].clone()
    sd["model.fc_coord.linear.bias"] = bias[coord_rows] - 0.5  # [0, 1] -> [-0.5, 0.5] of the crop
    sd["model.fc_sigma.linear.weight"] = weight[sigma_rows].clone()
    sd["model.fc_sigma.linear.bias"] = bias[sigma_rows].clone()
    loc, cov = sd.pop("mmpose_prior.loc", None), sd.pop("mmpose_prior.cov", None)
    if (loc is not None and not torch.equal(loc, torch.zeros(2))) or (cov is not None and not torch.equal(cov, torch.eye(2))):
        raise ValueError("mmpose RLE: the flow's prior is not the standard normal N(0, I) (loc / cov buffers)")
    return Converted(sd, _options(sd, coord_norm=False, input_normalization="imagenet"), "mmpose RLEHead")


def _options(sd: Mapping[str, Tensor], **options: object) -> dict[str, object]:
    backbone = resnet_name(sd, "model.backbone.")
    if backbone is None:
        raise ValueError("RLE: the backbone is not a ResNet-18/34/50/101/152")
    return {"backbone": backbone, **options}


def convert_pose_state_dict(state_dict: Mapping[str, Tensor]) -> Converted:
    """Any supported layout -> :class:`Converted` (``model.*`` and ``flow.*`` keys)."""
    layout = detect_pose_layout(state_dict)
    if layout == "rle_official":
        return convert_official(state_dict)
    if layout == "mmpose":
        return convert_mmpose(state_dict)
    return Converted(dict(state_dict), {}, "lit_tasks RLE")


def read_pose_weights(path: str) -> Converted:
    """A local RLE weights file (published or converted by ``tools/convert_weights.py``) as ours."""
    return read_converted(path, convert_pose_state_dict)
