"""Published segmentation weights onto our :class:`~lit_tasks.models.segmentation.segmenter.Segmenter`.

Layouts, recognised from the key names (:func:`convert_segmentation_state_dict`):

**torchvision** ``deeplabv3_resnet50/101`` and ``fcn_resnet50/101`` (``*_Weights.COCO_WITH_VOC_LABELS_V1``: 21 VOC
classes trained on the COCO subset that has them), with their auxiliary heads:

==============================================  ===================================================================
torchvision                                     ours
==============================================  ===================================================================
``backbone.{conv1,bn1,layerS.B.*}``             ``backbone.*`` (timm's ResNet names are torchvision's; dilated
                                                layer3 / layer4 = our ``output_stride=8``)
``classifier.0.convs.{0..3}.{0,1}.*``           ``head.aspp.branches.{0..3}.{0,1}.*`` (1x1, rates 12 / 24 / 36)
``classifier.0.convs.4.{1,2}.*``                ``head.aspp.pooling.conv.{0,1}.*`` (image pooling)
``classifier.0.project.{0,1}.*``                ``head.aspp.project.0.{0,1}.*``
``classifier.{1,2}.*``                          ``head.conv.{0,1}.*`` (DeepLabV3's 3x3 conv-BN)
``classifier.{0,1}.*`` (FCN)                    ``head.convs.0.{0,1}.*`` (one 3x3 conv of 2048 // 4 = 512)
``classifier.4.*``                              ``head.classifier.*`` (class head)
``aux_classifier.{0,1}.*``                      ``aux_head.convs.0.{0,1}.*`` (one 3x3 conv of 1024 // 4 = 256)
``aux_classifier.4.*``                          ``aux_head.classifier.*`` (class head)
==============================================  ===================================================================

torchvision's FCN heads are one conv of ``in_channels // 4`` without the input concatenated (``fcn_heads=
"torchvision"``, set from the file); its DeepLabV3 head, image pooling, bilinear upsampling of the logits
(``align_corners=False``) and ImageNet normalisation are ours already. Dropout (0.5 after torchvision's ASPP
projection, ours ``dropout``) only acts in training.

**mmsegmentation** PSPNet R50-D8 / R101-D8 (ResNetV1c: deep stem): see :data:`MMSEG_PSP_RULES`. Its DeepLabV3 /
DeepLabV3+ heads do not map onto ours (see :func:`convert_mmseg_pspnet`).

**lit_tasks**: our own names, taken as they are.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from lit_tasks.models.published import Converted, Rule, read_converted, rename, resnet_name

TORCHVISION_DEEPLABV3_RULES: list[Rule] = [
    (r"^backbone\.", "backbone."),
    (r"^classifier\.0\.convs\.([0-3])\.", r"head.aspp.branches.\1."),
    (r"^classifier\.0\.convs\.4\.1\.", "head.aspp.pooling.conv.0."),
    (r"^classifier\.0\.convs\.4\.2\.", "head.aspp.pooling.conv.1."),
    (r"^classifier\.0\.project\.([01])\.", r"head.aspp.project.0.\1."),
    (r"^classifier\.1\.", "head.conv.0."),
    (r"^classifier\.2\.", "head.conv.1."),
    (r"^classifier\.4\.", "head.classifier."),
    (r"^aux_classifier\.([01])\.", r"aux_head.convs.0.\1."),
    (r"^aux_classifier\.4\.", "aux_head.classifier."),
]
TORCHVISION_FCN_RULES: list[Rule] = [
    (r"^backbone\.", "backbone."),
    (r"^classifier\.([01])\.", r"head.convs.0.\1."),
    (r"^classifier\.4\.", "head.classifier."),
    (r"^aux_classifier\.([01])\.", r"aux_head.convs.0.\1."),
    (r"^aux_classifier\.4\.", "aux_head.classifier."),
]
CLASS_HEAD = ("head.classifier.weight", "head.classifier.bias", "aux_head.classifier.weight", "aux_head.classifier.bias")


def detect_segmentation_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"torchvision_deeplabv3"``, ``"torchvision_fcn"``, ``"mmseg_pspnet"`` or ``"lit_tasks"``."""
    keys = set(state_dict)
    if "classifier.0.convs.0.0.weight" in keys:
        return "torchvision_deeplabv3"
    if "classifier.4.weight" in keys and "backbone.layer4.0.conv1.weight" in keys:
        return "torchvision_fcn"
    if "decode_head.conv_seg.weight" in keys and any(k.startswith("decode_head.psp_modules.") for k in keys):
        return "mmseg_pspnet"
    if "head.classifier.weight" in keys:
        return "lit_tasks"
    if "decode_head.conv_seg.weight" in keys:
        raise ValueError("an mmsegmentation checkpoint of a head other than PSPHead: only PSPNet maps onto ours (the "
                         "DeepLabV3 / V3+ heads of mmsegmentation differ: see README 'Start from published weights')")
    raise ValueError(f"not a segmentation state dict of a known layout (torchvision deeplabv3 / fcn, mmsegmentation "
                     f"PSPNet, lit_tasks); first keys: {list(state_dict)[:5]}")


def convert_torchvision(state_dict: Mapping[str, Tensor]) -> Converted:
    """torchvision ``deeplabv3_resnet*`` / ``fcn_resnet*`` -> ours (table in the module docstring)."""
    deeplab = detect_segmentation_layout(state_dict) == "torchvision_deeplabv3"
    name = "deeplabv3" if deeplab else "fcn"
    sd = rename(state_dict, TORCHVISION_DEEPLABV3_RULES if deeplab else TORCHVISION_FCN_RULES, f"torchvision {name}")
    backbone = resnet_name(sd, "backbone.")
    if backbone is None or not backbone.startswith(("resnet50", "resnet101", "resnet152")):
        raise ValueError(f"torchvision {name}: the backbone is not a ResNet-50 / 101 / 152")
    # torchvision dilates layer3 and layer4 (replace_stride_with_dilation=[False, True, True]): output stride 8.
    options = dict(model=name, backbone=backbone, output_stride=8, fcn_heads="torchvision")
    if deeplab:
        options.update(aspp_rates=[12, 24, 36], head_channels=int(sd["head.conv.0.weight"].shape[0]))
    head = tuple(k for k in CLASS_HEAD if k in sd)
    return Converted(sd, options, f"torchvision {name}_{backbone}", head)


def convert_segmentation_state_dict(state_dict: Mapping[str, Tensor]) -> Converted:
    """Any supported layout -> :class:`Converted`."""
    layout = detect_segmentation_layout(state_dict)
    if layout.startswith("torchvision"):
        return convert_torchvision(state_dict)
    if layout == "mmseg_pspnet":
        return convert_mmseg_pspnet(state_dict)
    return Converted(dict(state_dict), {}, "lit_tasks Segmenter", tuple(k for k in CLASS_HEAD if k in state_dict))


def read_segmentation_weights(path: str) -> Converted:
    """A local segmentation weights file (published or converted by ``tools/convert_weights.py``) as ours."""
    return read_converted(path, convert_segmentation_state_dict)


# -- mmsegmentation PSPNet ----------------------------------------------------------------------------------------
# mmsegmentation ``configs/_base_/models/pspnet_r50-d8.py``: ``ResNetV1c`` (deep stem of three 3x3 convs, no average
# pooling in the shortcut: timm's ``resnet50c`` / ``resnet101c``; dilations 1, 1, 2, 4 with ``contract_dilation``, i.e.
# the first block of a dilated stage at half its dilation, as timm's ``output_stride=8``), ``PSPHead(channels=512,
# pool_scales=(1, 2, 3, 6))``, auxiliary ``FCNHead(in_channels=1024, channels=256, num_convs=1, concat_input=False)``.
# ``ConvModule`` keeps its conv under ``.conv`` and its (Sync)BN under ``.bn``.
MMSEG_PSP_RULES: list[Rule] = [
    (r"^backbone\.stem\.([0-7])\.", lambda m: "backbone.bn1." if m[1] == "7" else f"backbone.conv1.{m[1]}."),
    (r"^backbone\.", "backbone."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"head.ppm.stages.\1.1.0."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"head.ppm.stages.\1.1.1."),
    (r"^decode_head\.bottleneck\.conv\.", "head.bottleneck.0."),
    (r"^decode_head\.bottleneck\.bn\.", "head.bottleneck.1."),
    (r"^decode_head\.conv_seg\.", "head.classifier."),
    (r"^auxiliary_head\.convs\.(\d+)\.conv\.", r"aux_head.convs.\1.0."),
    (r"^auxiliary_head\.convs\.(\d+)\.bn\.", r"aux_head.convs.\1.1."),
    (r"^auxiliary_head\.conv_seg\.", "aux_head.classifier."),
]


def convert_mmseg_pspnet(state_dict: Mapping[str, Tensor]) -> Converted:
    """mmsegmentation PSPNet R50-D8 / R101-D8 -> ours (:data:`MMSEG_PSP_RULES`).

    Records ``model="pspnet"``, the backbone (``resnet50c`` / ``resnet101c``), ``output_stride=8``, the pool scales
    of mmseg's configs (1, 2, 3, 6: the pooling sizes are not in the weights, only their number) and ``head_channels``
    (our PSP bottleneck is twice it: mmseg's 512; the auxiliary head has it: 256). The mmsegmentation DeepLabV3 /
    V3+ checkpoints do not map: their ``ASPPHead`` fuses the branches with a 3x3 bottleneck (ours, as torchvision: a
    1x1 projection, then a 3x3 conv) and V3+'s ``DepthwiseSeparableASPPHead`` uses depthwise-separable convolutions
    in the ASPP branches and the decoder, 512 wide.
    """
    sd = rename(state_dict, MMSEG_PSP_RULES, "mmsegmentation PSPNet")
    if "backbone.conv1.6.weight" not in sd:
        raise ValueError("mmsegmentation PSPNet: the backbone has no ResNetV1c deep stem (backbone.stem.6)")
    depth = resnet_name(sd, "backbone.")
    if depth not in ("resnet50", "resnet101", "resnet152"):
        raise ValueError("mmsegmentation PSPNet: the backbone is not a ResNetV1c-50 / 101 / 152")
    scales = len({k.split(".")[3] for k in sd if k.startswith("head.ppm.stages.")})
    if scales != 4:
        raise ValueError(f"mmsegmentation PSPNet with {scales} pyramid levels: only mmseg's (1, 2, 3, 6) is known")
    bottleneck = int(sd["head.bottleneck.0.weight"].shape[0])
    options = dict(model="pspnet", backbone=f"{depth}c", output_stride=8, pool_scales=[1, 2, 3, 6],
                   head_channels=bottleneck // 2, fcn_heads="mmseg")
    return Converted(sd, options, f"mmsegmentation pspnet_{depth.replace('resnet', 'r')}-d8",
                     tuple(k for k in CLASS_HEAD if k in sd))
