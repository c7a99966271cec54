"""Feature Pyramid Network (Lin et al. 2017) with the RetinaNet/FCOS extra levels P6-P7."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Top-down pyramid over backbone maps C3..C5, plus ``num_extra`` stride-2 levels on the P5 output.

    FCOS uses P3-P7 (strides 8..128): extra convs on the P5 *output* with ReLU before each extra conv
    after the first (mmdet ``add_extra_convs="on_output"``, ``relu_before_extra_convs=True``).

    Args:
        in_channels: channels of the input maps, finest first (``feature_info.channels()``).
        out_channels: channels of every pyramid level.
        num_extra: extra levels after the last input level (2 for P6, P7).
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, num_extra: int = 2) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_extra)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps finest first -> pyramid levels finest first (len(features) + num_extra)."""
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        for i, conv in enumerate(self.extra):
            outs.append(stride2_conv(conv, outs[-1] if i == 0 else F.relu(outs[-1])))
        return outs


def stride2_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3 stride-2 padding-1 conv; on a map one column wide, with width stride 1 (the same output:
    one column either way). torch 2.14's CPU bfloat16 convolution returns garbage weight gradients (up to 1e37, or
    NaN) for stride 2 over a one-column input: P6 / P7 of small images under bf16-mixed (tests/test_fpn.py)."""
    if x.shape[-1] == 1:
        return F.conv2d(x, conv.weight, conv.bias, stride=(conv.stride[0], 1), padding=conv.padding)
    return conv(x)


def flatten_levels(maps: list[torch.Tensor], per_level: int) -> list[torch.Tensor]:
    """Maps ``[a_0, b_0, ..., a_1, b_1, ...]`` (``per_level`` of each level, (B, c, H_l, W_l)) -> ``[a, b, ...]``
    each (B, P, c): levels finest first, row-major within a level."""
    return [torch.cat([m.flatten(2) for m in maps[k::per_level]], dim=2).transpose(1, 2) for k in range(per_level)]
