"""Pyramid pooling (PSPNet, Zhao et al. 2017, §3.2): spatial pyramid pooling of the last stage as context.

The feature map is average-pooled to 1x1, 2x2, 3x3 and 6x6 bins (the spatial pyramid pooling of He et al.
2014 kept as maps rather than flattened), each level reduced by a 1x1 conv to 1/N of the input channels
(N = number of levels), upsampled bilinearly and concatenated with the input; a 3x3 conv fuses them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tasks.models.segmentation.fcn import conv_bn_relu


class PyramidPooling(nn.Module):
    """Pool to each ``bins x bins`` grid, 1x1 conv-BN-ReLU, upsample, concatenate with the input.

    Output channels: ``in_channels + len(pool_scales) * (in_channels // len(pool_scales))``.
    """

    def __init__(self, in_channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_scales = tuple(int(s) for s in pool_scales)
        branch_channels = max(1, in_channels // len(self.pool_scales))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, branch_channels, 1))
            for s in self.pool_scales
        )
        self.out_channels = in_channels + len(self.pool_scales) * branch_channels

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> ``(B, out_channels, h, w)``."""
        size = x.shape[-2:]
        outs = [x]
        for stage in self.stages:
            outs.append(F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


class PSPHead(nn.Module):
    """PSPNet head: pyramid pooling -> 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        channels: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels, pool_scales)
        self.bottleneck = conv_bn_relu(self.ppm.out_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` last-stage features -> ``(B, num_classes, h, w)`` logits."""
        return self.classifier(self.dropout(self.bottleneck(self.ppm(x))))
