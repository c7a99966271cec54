"""FPN extra levels (lit_tasks/models/fpn.py) on maps one column wide, where torch's CPU bf16 stride-2 convolution
computes wrong weight gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_tasks.models.fpn import FPN, stride2_conv


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (2, 5), (4, 4)])
def test_stride2_conv_equals_the_conv(size) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 8, *size)
    torch.testing.assert_close(stride2_conv(conv, x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("width", [1, 2])
def test_extra_level_gradients_under_bf16_match_float32(width) -> None:
    """P6 / P7 of a 64-px image are 1 x 1: the weight gradient of the extra convs under bf16 autocast must be the
    float32 one to bf16 precision (the plain stride-2 conv gave values up to 1e37 or NaN there)."""
    torch.manual_seed(0)
    fpn = FPN([8, 16, 32], out_channels=64)
    features = [torch.randn(2, 8, 8, 4 * width), torch.randn(2, 16, 4, 2 * width), torch.randn(2, 32, 2, width)]
    grads = []
    for bf16 in (False, True):
        fpn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = fpn(features)
        sum(o.float().sum() for o in outs).backward()
        grads.append([conv.weight.grad.clone() for conv in fpn.extra])
    for fp32, bf16 in zip(*grads):
        # bf16 inputs and weights (8 significant bits): each product off by ~2^-8 relative, sums of <= 2 x 9 x 64
        # products of mixed signs; 5 % of the largest entry is far above that and far below the garbage
        assert torch.isfinite(bf16).all()
        assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max()
