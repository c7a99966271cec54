"""Segmentation networks: shapes, dilation, ASPP rates, pyramid bins, the DeepLabV3+ skip, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_tasks.models.segmentation.aspp import ASPP, DeepLabV3PlusHead, ImagePooling, aspp_rates
from lit_tasks.models.segmentation.fcn import FCNHead, conv_bn_relu
from lit_tasks.models.segmentation.psp import PSPHead, PyramidPooling
from lit_tasks.segmentation import SemanticSegmentationTask

BACKBONE = "test_resnet"  # timm's smallest ResNet: 5 feature levels, dilation support


def dilations(module: nn.Module) -> list[int]:
    """Dilation of every 3x3 conv in ``module``, in order."""
    return [m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("model", ["deeplabv3plus", "deeplabv3", "pspnet", "fcn"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_matches_odd_input_size(model, output_stride):
    torch.manual_seed(0)
    task = SemanticSegmentationTask(num_classes=5, model=model, backbone=BACKBONE, output_stride=output_stride,
                                    head_channels=16).eval()  # fmt: skip
    images = torch.rand(2, 3, 53, 37)
    logits, aux = task.model.forward_with_aux(images)
    assert logits.shape == (2, 5, 53, 37) and aux.shape == (2, 5, 53, 37)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_backbone_last_stage_has_the_output_stride(output_stride):
    task = SemanticSegmentationTask(num_classes=3, model="deeplabv3", backbone=BACKBONE, output_stride=output_stride,
                                    head_channels=8, aux_weight=0.0)  # fmt: skip
    low, mid, high = task.model.backbone(torch.rand(1, 3, 64, 96))
    assert low.shape[-2:] == (16, 24)  # the DeepLabV3+ skip is at stride 4
    assert high.shape[-2:] == (64 // output_stride, 96 // output_stride)
    # Atrous convolution replaces striding: the last stage is dilated by 32 / output_stride.
    assert max(dilations(task.model.backbone)) == 32 // output_stride


@pytest.mark.parametrize("output_stride, expected", [(16, [6, 12, 18]), (8, [12, 24, 36])])
def test_aspp_rates_follow_output_stride(output_stride, expected):
    task = SemanticSegmentationTask(num_classes=3, model="deeplabv3plus", backbone=BACKBONE,
                                    output_stride=output_stride, head_channels=8)  # fmt: skip
    assert dilations(task.model.head.aspp) == expected
    assert [b[0].padding[0] for b in task.model.head.aspp.branches[1:]] == expected  # "same" padding
    assert task.model.head.aspp.branches[0][0].kernel_size == (1, 1)
    assert isinstance(task.model.head.aspp.pooling, ImagePooling)


def test_aspp_rates_from_config_override():
    task = SemanticSegmentationTask(num_classes=3, model="deeplabv3", backbone=BACKBONE, aspp_rates=[2, 4, 6, 8],
                                    head_channels=8)  # fmt: skip
    assert dilations(task.model.head.aspp) == [2, 4, 6, 8]
    assert len(task.model.head.aspp.branches) == 5  # 1x1 + one per rate (image pooling is separate)
    with pytest.raises(ValueError, match="output_stride"):
        aspp_rates(4)


def test_image_pooling_is_global_average_broadcast():
    torch.manual_seed(0)
    pool = ImagePooling(4, 3).eval()
    x = torch.randn(2, 4, 5, 7)
    y = pool(x)
    expected = pool.conv(x.mean(dim=(2, 3), keepdim=True))
    assert y.shape == (2, 3, 5, 7)
    torch.testing.assert_close(y, expected.expand(-1, -1, 5, 7))


def test_aspp_branches_concatenate_into_projection():
    aspp = ASPP(in_channels=8, out_channels=4, rates=(1, 2, 3)).eval()
    assert aspp.project[0][0].in_channels == 5 * 4
    assert aspp(torch.randn(1, 8, 9, 9)).shape == (1, 4, 9, 9)


def test_pyramid_pooling_bins_and_channels():
    ppm = PyramidPooling(16, pool_scales=(1, 2, 3, 6)).eval()
    assert [stage[0].output_size for stage in ppm.stages] == [1, 2, 3, 6]
    assert ppm.out_channels == 16 + 4 * 4
    x = torch.randn(1, 16, 12, 12)
    y = ppm(x)
    assert y.shape == (1, 32, 12, 12)
    torch.testing.assert_close(y[:, :16], x)  # the input passes through unchanged
    # The 1-bin level is the global average, constant over the map.
    level1 = y[:, 16:20]
    assert torch.allclose(level1, level1[..., :1, :1].expand_as(level1))
    head = PSPHead(in_channels=16, num_classes=3, channels=8).eval()
    assert head(x).shape == (1, 3, 12, 12)


def test_deeplabv3plus_decoder_uses_the_stride4_skip():
    torch.manual_seed(0)
    head = DeepLabV3PlusHead(in_channels=8, low_level_channels=6, num_classes=3, rates=(1, 2, 3), channels=8).eval()
    high, low = torch.randn(1, 8, 4, 4), torch.randn(1, 6, 16, 16)
    out = head(high, low)
    assert out.shape == (1, 3, 16, 16)
    assert head.skip[0].out_channels == 48  # the paper's reduced skip width
    low2 = low.clone()
    low2[..., 0, 0] += 5.0
    changed = (head(high, low2) - out).abs().sum(dim=1)[0] > 1e-6
    # A change at one stride-4 pixel moves only its neighbourhood (two 3x3 convs: a 5x5 window).
    assert changed[0, 0] and not changed[8:, 8:].any()


def test_fcn_head_layers():
    head = FCNHead(in_channels=8, num_classes=4, channels=6, num_convs=2, concat_input=True)
    assert len(head.convs) == 2 and head.fuse[0].in_channels == 8 + 6
    assert head(torch.randn(1, 8, 5, 5)).shape == (1, 4, 5, 5)
    linear = FCNHead(in_channels=8, num_classes=4, num_convs=0)
    assert linear.fuse is None and linear.classifier.in_channels == 8
    assert conv_bn_relu(3, 5, 3, dilation=4)[0].padding == (4, 4)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    a = SemanticSegmentationTask(num_classes=4, backbone=BACKBONE, head_channels=16, channels_last=True).eval()
    b = SemanticSegmentationTask(num_classes=4, backbone=BACKBONE, head_channels=16, channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)
    conv = next(m for m in a.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_invalid_choices_raise():
    with pytest.raises(ValueError, match="model must be one of"):
        SemanticSegmentationTask(num_classes=3, model="unet", backbone=BACKBONE)
    with pytest.raises(ValueError, match="output_stride"):
        SemanticSegmentationTask(num_classes=3, backbone=BACKBONE, output_stride=4)
    with pytest.raises(ValueError, match="class_weights"):
        SemanticSegmentationTask(num_classes=3, backbone=BACKBONE, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="feature_indices"):
        SemanticSegmentationTask(num_classes=3, backbone=BACKBONE, feature_indices=[1, 4])
