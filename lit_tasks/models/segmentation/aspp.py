"""Atrous Spatial Pyramid Pooling and the DeepLabV3 / DeepLabV3+ heads.

DeepLabV3 (Chen et al. 2017, "Rethinking Atrous Convolution", §3.3): parallel branches over the last
(dilated) backbone stage -- one 1x1 conv, three 3x3 atrous convs with rates (6, 12, 18) at output stride 16
(doubled to (12, 24, 36) at output stride 8), and image-level pooling (global average -> 1x1 conv -> upsample)
-- each 256 channels with BN, concatenated and projected by a 1x1 conv.

DeepLabV3+ (Chen et al. 2018, §3.1 and Fig. 2): the ASPP output is upsampled by 4 and concatenated with the
stride-4 backbone features (reduced to 48 channels by a 1x1 conv), refined by two 3x3 convs, then classified.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tasks.models.segmentation.fcn import conv_bn_relu


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """The paper's atrous rates for an output stride: (6, 12, 18) at 16, doubled at 8 (§4.1 of DeepLabV3)."""
    if output_stride == 16:
        return (6, 12, 18)
    if output_stride == 8:
        return (12, 24, 36)
    if output_stride == 32:  # undilated backbone: halve, as the rates scale with the feature resolution
        return (3, 6, 9)
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


class ImagePooling(nn.Module):
    """Image-level features: global average pool -> 1x1 conv-BN-ReLU -> bilinear upsample to the input size.

    Note: the BN sees one value per channel and sample, so training needs a batch of at least 2.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.pool(x))
        # A 1x1 map upsampled bilinearly is a broadcast; expand avoids the interpolation kernel.
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """ASPP: a 1x1 branch, one 3x3 branch per atrous rate and image pooling, concatenated and projected.

    Args:
        in_channels: channels of the backbone's last stage.
        out_channels: channels of every branch and of the projection (256 in the paper).
        rates: dilation of each 3x3 branch.
        dropout: dropout after the projection.
    """

    def __init__(
        self, *, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        branches = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in self.rates]
        self.branches = nn.ModuleList(branches)
        self.pooling = ImagePooling(in_channels, out_channels)
        self.project = nn.Sequential(
            conv_bn_relu((len(branches) + 1) * out_channels, out_channels, 1), nn.Dropout2d(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> ``(B, out_channels, h, w)``."""
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pooling(x))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier, at the backbone's output stride."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels=in_channels, out_channels=channels, rates=rates, dropout=dropout)
        self.conv = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` last-stage features -> ``(B, num_classes, h, w)`` logits."""
        return self.classifier(self.conv(self.aspp(x)))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+: ASPP on the last stage, upsampled to the stride-4 skip, fused by two 3x3 convs, classified.

    Args:
        in_channels: channels of the last backbone stage.
        low_level_channels: channels of the stride-4 skip features.
        num_classes: output channels.
        rates: ASPP atrous rates.
        channels: ASPP and decoder width (256 in the paper).
        low_level_reduced: the skip is reduced to this many channels (48 in the paper, §4.1: fewer
            channels keep the rich encoder features from being outweighed).
        dropout: dropout in ASPP and before the classifier.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        channels: int = 256,
        low_level_reduced: int = 48,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels=in_channels, out_channels=channels, rates=rates, dropout=dropout)
        self.skip = conv_bn_relu(low_level_channels, low_level_reduced, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_level_reduced, channels, 3), conv_bn_relu(channels, channels, 3)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        """``x`` ``(B, in_channels, h, w)`` and ``low_level`` ``(B, low_level_channels, H/4, W/4)`` -> logits at H/4."""
        y = self.aspp(x)
        y = F.interpolate(y, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([y, self.skip(low_level)], dim=1))
        return self.classifier(self.dropout(y))
