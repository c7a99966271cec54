"""FCN head: the plain baseline over a dilated backbone, and the auxiliary head on stage 3.

A stack of 3x3 conv-BN-ReLU layers and a 1x1 classifier (Long et al. 2015, as reimplemented over dilated
ResNets by mmsegmentation's FCNHead: two convs, input concatenated before the last conv, dropout 0.1).
``conv_bn_relu`` is the unit every segmentation head here is built from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BatchNorm -> ReLU with 'same' padding for odd kernels and any dilation."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """``num_convs`` 3x3 conv-BN-ReLU layers, optional skip of the input, dropout and a 1x1 classifier.

    Args:
        in_channels: channels of the feature map.
        num_classes: output channels (one score per class).
        channels: width of the hidden convs.
        num_convs: number of 3x3 convs (0 gives a linear 1x1 classifier on the input).
        concat_input: concatenate the input with the conv output before a fusing 3x3 conv.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers, width = [], in_channels
        for _ in range(num_convs):
            layers.append(conv_bn_relu(width, channels, 3))
            width = channels
        self.convs = nn.Sequential(*layers)
        self.fuse = conv_bn_relu(in_channels + width, channels, 3) if concat_input and num_convs > 0 else None
        if self.fuse is not None:
            width = channels
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` features -> ``(B, num_classes, h, w)`` logits."""
        y = self.convs(x)
        if self.fuse is not None:
            y = self.fuse(torch.cat([x, y], dim=1))
        return self.classifier(self.dropout(y))
