"""RLE regression network: head formulas, shapes / dtypes, coordinate normalisation and the flip-back."""

from __future__ import annotations

import math

import pytest
import torch

from lit_tasks.models.pose.rle import (
    FeatureNormLinear,
    RLERegressor,
    flip_back_normalized,
    keypoint_scores,
    normalized_to_pixels,
    pixels_to_normalized,
)


def test_feature_norm_linear_formula_and_scale_invariance() -> None:
    torch.manual_seed(0)
    layer = FeatureNormLinear(16, 6, norm=True).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    w, b = layer.linear.weight, layer.linear.bias
    want = (x @ w.T) / x.norm(dim=1, keepdim=True) + b
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer(7.5 * x), layer(x), atol=1e-12, rtol=0)  # the point of the trick
    plain = FeatureNormLinear(16, 6, norm=False).double()
    torch.testing.assert_close(plain(x), x @ plain.linear.weight.T + plain.linear.bias, atol=1e-12, rtol=0)
    assert not torch.allclose(plain(7.5 * x), plain(x))
    assert torch.isfinite(layer(torch.zeros(2, 16, dtype=torch.float64))).all()


def test_head_init_is_xavier_gain_001() -> None:
    torch.manual_seed(1)
    layer = FeatureNormLinear(512, 34)
    bound = 0.01 * math.sqrt(6.0 / (512 + 34))
    assert layer.linear.weight.abs().max() <= bound
    assert layer.linear.weight.abs().max() > 0.9 * bound  # uniform over the whole range, not ~0


def test_forward_shapes_ranges_and_predict() -> None:
    torch.manual_seed(2)
    model = RLERegressor(backbone="resnet10t", num_keypoints=5).eval()
    images = torch.rand(3, 3, 64, 48)  # H != W, as 256x192
    out = model(images)
    assert out["coords"].shape == (3, 5, 2) and out["sigma"].shape == (3, 5, 2)
    assert out["coords"].dtype == torch.float32
    assert ((out["sigma"] > 0) & (out["sigma"] < 1)).all()
    keypoints, scores = model.predict(images)
    torch.testing.assert_close(keypoints, (out["coords"] + 0.5) * torch.tensor([48.0, 64.0]))
    torch.testing.assert_close(scores, (1 - out["sigma"]).mean(-1))
    assert scores.shape == (3, 5)
    assert not any("flow" in name for name, _ in model.named_modules())  # inference has no flow


def test_bf16_autocast_outputs_fp32() -> None:
    torch.manual_seed(3)
    model = RLERegressor(backbone="resnet10t", num_keypoints=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 64, 48))
    assert out["coords"].dtype == torch.float32 and out["sigma"].dtype == torch.float32
    assert torch.isfinite(out["coords"]).all()


def test_pixel_normalisation_round_trip_and_corners() -> None:
    size = (256, 192)  # (H, W)
    corners = torch.tensor([[0.0, 0.0], [192.0, 256.0], [96.0, 128.0]])
    torch.testing.assert_close(pixels_to_normalized(corners, size),
                               torch.tensor([[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0]]))
    pts = torch.rand(2, 7, 2) * 200
    torch.testing.assert_close(normalized_to_pixels(pixels_to_normalized(pts, size), size), pts)


def test_flip_back_normalized_inverts_a_mirrored_crop() -> None:
    """Keypoints seen on the crop mirrored ``x -> W - 1 - x`` with left/right swapped come back exactly."""
    size = (64, 48)
    flip_index = [0, 2, 1, 4, 3]
    g = torch.Generator().manual_seed(4)
    pts = torch.rand(2, 5, 2, generator=g) * torch.tensor([48.0, 64.0])
    mirrored = pts[:, flip_index].clone()
    mirrored[..., 0] = 48 - 1 - mirrored[..., 0]
    back = flip_back_normalized(pixels_to_normalized(mirrored, size), flip_index, width=48)
    torch.testing.assert_close(back, pixels_to_normalized(pts, size))


def test_keypoint_scores() -> None:
    sigma = torch.tensor([[[0.1, 0.3], [0.5, 0.5]]])
    torch.testing.assert_close(keypoint_scores(sigma), torch.tensor([[0.8, 0.5]]))


def test_bad_num_keypoints() -> None:
    with pytest.raises(ValueError, match="num_keypoints"):
        RLERegressor(backbone="resnet10t", num_keypoints=0)
