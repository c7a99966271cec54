"""FCOS's head runs in its input's memory format: a channels_last FPN's NHWC maps stay NHWC through the GN towers
(no conversion to NCHW and back), with the NCHW head's outputs and gradients."""

from __future__ import annotations

import copy

import torch

from lit_tasks.models.detection.fcos import FCOSHead

CHANNELS, CONVS = 32, 2
# A conv output sums CHANNELS * 9 = 288 products; summed in another order, float32 (eps 1.2e-7) differs by at most
# 288 * eps = 3.4e-5 of the sum of the magnitudes, per conv; three convs deep (GN rescales, it adds no error of
# its own beyond a few eps): 2e-4 of the largest value bounds the difference of outputs and of parameter gradients.
TOL = 2e-4


def _head() -> FCOSHead:
    torch.manual_seed(0)
    head = FCOSHead(num_classes=3, channels=CHANNELS, num_convs=CONVS, num_levels=2)
    for conv in head.modules():  # weights of order 1, so nothing vanishes in the 0.01-std initialisation
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.normal_(conv.weight, std=(CHANNELS * 9) ** -0.5)
    return head


def test_channels_last_input_stays_channels_last_with_the_nchw_outputs_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, CHANNELS, 12, 10, generator=g)
    nchw, nhwc = _head(), copy.deepcopy(_head())
    outs_a = nchw.forward_level(x, 1)  # 3 and 4 channels: NCHW maps are not channels_last contiguous
    outs_b = nhwc.forward_level(x.contiguous(memory_format=torch.channels_last), 1)
    grads = [torch.randn(o.shape, generator=g) for o in outs_a]
    torch.autograd.backward(outs_a, grads)
    torch.autograd.backward(outs_b, grads)
    for a, b in zip(outs_a, outs_b):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, rtol=0, atol=TOL * float(a.abs().max()))
    for (name, pa), pb in zip(nchw.named_parameters(), nhwc.parameters()):
        scale = float(pa.grad.abs().max())
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=TOL * scale, msg=name)
