"""Semantic segmentation network: dilated timm backbone + context head (+ auxiliary FCN head), logits at input size.

Method (Chen et al. 2017 "Rethinking Atrous Convolution", §3; Chen et al. 2018 "DeepLabV3+", §3; Zhao et al.
2017 "PSPNet", §3): a classification backbone whose last stages trade striding for atrous (dilated)
convolution, so features stay at 1/16 or 1/8 of the input (``output_stride``) with unchanged receptive
fields; a context head on the last stage (ASPP with image pooling, pyramid pooling, or plain convs); for
DeepLabV3+ a decoder that fuses the stride-4 features; bilinear upsampling of the logits to the input size.
An auxiliary FCN head on stage 3 (PSPNet §3.3, mmsegmentation's recipes) is used in training only.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lit_tasks.models.segmentation.aspp import DeepLabV3Head, DeepLabV3PlusHead, aspp_rates
from lit_tasks.models.backbone import Normalize, build_backbone
from lit_tasks.models.segmentation.fcn import FCNHead
from lit_tasks.models.segmentation.psp import PSPHead

SegmenterName = Literal["deeplabv3plus", "deeplabv3", "pspnet", "fcn"]
FCN_HEADS = ("mmseg", "torchvision")


class Segmenter(nn.Module):
    """``(B, 3, H, W)`` images in [0, 1] -> ``(B, C, H, W)`` class logits (ImageNet mean/std applied inside).

    Args:
        num_classes: output classes.
        model: ``"deeplabv3plus"``, ``"deeplabv3"``, ``"pspnet"`` or ``"fcn"``.
        backbone: any timm model with ``features_only`` and ``output_stride`` support.
        pretrained: timm's ImageNet weights (downloads).
        output_stride: 8 or 16 (dilated last stages), or 32 (no dilation).
        feature_indices: timm feature indices of (stride-4 skip, stage feeding the auxiliary head, last stage).
        rates: ASPP atrous rates; None = the paper's for ``output_stride``.
        pool_scales: PSP pyramid bins.
        head_channels: width of the ASPP / decoder / FCN convs (the PSP bottleneck uses twice this).
        dropout: dropout before the classifiers.
        aux_head: build the auxiliary FCN head on the middle feature level.
        fcn_heads: the FCN heads (the ``fcn`` model's head and every auxiliary head): ``"mmseg"`` (mmsegmentation's
            FCNHead: ``head_channels`` wide; ``fcn``: two 3x3 convs, the input concatenated before the second) or
            ``"torchvision"`` (torchvision's FCNHead: one 3x3 conv of ``in_channels // 4``, no concatenation; what
            its ``fcn_resnet*`` / ``deeplabv3_resnet*`` weights need).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        model: SegmenterName = "deeplabv3plus",
        backbone: str = "resnet50",
        pretrained: bool = False,
        output_stride: int = 16,
        feature_indices: Sequence[int] = (1, 3, 4),
        rates: Sequence[int] | None = None,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        head_channels: int = 256,
        dropout: float = 0.1,
        aux_head: bool = True,
        fcn_heads: str = "mmseg",
    ) -> None:
        super().__init__()
        if fcn_heads not in FCN_HEADS:
            raise ValueError(f"fcn_heads must be one of {FCN_HEADS}, got {fcn_heads!r}")
        torchvision = fcn_heads == "torchvision"
        if len(feature_indices) != 3:
            raise ValueError(f"feature_indices must name 3 feature levels (skip, aux, last), got {list(feature_indices)}")
        self.normalize = Normalize()
        self.backbone = build_backbone(backbone, pretrained=pretrained, out_indices=tuple(feature_indices),
                                       output_stride=None if output_stride == 32 else output_stride)
        low_ch, aux_ch, high_ch = self.backbone.feature_info.channels()
        c, width = num_classes, head_channels
        rates = tuple(rates) if rates else aspp_rates(output_stride)
        match model:
            case "deeplabv3plus":
                self.head: nn.Module = DeepLabV3PlusHead(in_channels=high_ch, low_level_channels=low_ch, num_classes=c,
                                                         rates=rates, channels=width, dropout=dropout)
            case "deeplabv3":
                self.head = DeepLabV3Head(in_channels=high_ch, num_classes=c, rates=rates, channels=width,
                                          dropout=dropout)
            case "pspnet":
                self.head = PSPHead(in_channels=high_ch, num_classes=c, pool_scales=tuple(pool_scales),
                                    channels=2 * width, dropout=dropout)
            case "fcn" if torchvision:
                self.head = FCNHead(in_channels=high_ch, num_classes=c, channels=high_ch // 4, num_convs=1,
                                    concat_input=False, dropout=dropout)
            case "fcn":
                self.head = FCNHead(in_channels=high_ch, num_classes=c, channels=width, num_convs=2, concat_input=True,
                                    dropout=dropout)
            case _:
                raise ValueError(f"model must be one of deeplabv3plus, deeplabv3, pspnet, fcn; got {model!r}")
        self.uses_skip = isinstance(self.head, DeepLabV3PlusHead)  # the V3+ decoder also reads the stride-4 map
        aux_width = aux_ch // 4 if torchvision else width
        self.aux_head = FCNHead(in_channels=aux_ch, num_classes=c, channels=aux_width, num_convs=1, concat_input=False,
                                dropout=dropout) if aux_head else None

    def _logits(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        low, _, high = features
        logits = self.head(high, low) if self.uses_skip else self.head(high)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        return self._logits(self.backbone(self.normalize(images)), images.shape[-2:])

    def forward_with_aux(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and the auxiliary head's logits (None without one), both at the input size (training)."""
        features = self.backbone(self.normalize(images))
        size = images.shape[-2:]
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(features[1]), size=size, mode="bilinear", align_corners=False)
        return self._logits(features, size), aux
