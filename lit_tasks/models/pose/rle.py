"""RLE regression network (Li et al. 2021, §3.4): backbone -> global average pool -> coordinates and sigmas.

As the official ``RegressFlow`` (Jeff-sjtu/res-loglikelihood-regression, ``rlepose/models/regression_nf.py``,
config ``NUM_FC_FILTERS: [-1]``, i.e. no hidden FC layer):

* a timm backbone (last stage only) and ``AdaptiveAvgPool2d(1)`` give one C-d feature ``f`` per crop;
* ``fc_coord``: ``mu_hat = W f / ||f||_2 + b`` (the official ``Linear(norm=True)``: the feature is divided by
  its L2 norm *after* the matmul and *before* the bias), so the coordinate output does not scale with the
  feature magnitude; weights xavier-uniform with gain 0.01, bias PyTorch's default;
* ``fc_sigma``: the same Linear without the norm, then a sigmoid: ``sigma_hat`` in (0, 1) per axis;
* no activation on ``mu_hat``: normalised coordinates, ``x / W - 0.5`` and ``y / H - 0.5`` of the crop
  (``W x H`` = input size, so the crop spans [-0.5, 0.5]; the official ``_integral_target_generator``);
* keypoint confidence ``score_k = mean_d (1 - sigma_hat_kd)`` (the official ``maxvals``), one per keypoint.
  The instance score used for COCO results is computed from these by the task (e.g. mmpose's ``bbox_rle``:
  box score + mean + max of the keypoint scores).

mmpose's ``RLEHead`` differs: one ``nn.Linear(C, 4K)`` without the feature norm, ``Normal(0, 0.01)`` init,
coordinates normalised to [0, 1] instead of [-0.5, 0.5] (REFERENCE.md §8.3). The official code subtracts a
per-channel mean from the image without dividing by a std; we normalise with ImageNet mean / std inside
the network (:class:`~lit_tasks.models.backbone.Normalize`) as mmpose and every timm backbone expects, so
images enter in [0, 1]. The flow of RLE lives in the loss (:class:`~lit_tasks.losses.rle.RLELoss`): this
network is the whole inference graph, identical to a plain L1-regression model's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_tasks.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Normalize, build_backbone

# Input normalisations: ImageNet mean / std (mmpose, timm), or the official RLE code's: the RGB crop in [0, 1] minus
# (0.406, 0.457, 0.480) per channel (ImageNet's means in BGR order, inherited from AlphaPose), no division.
INPUT_NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "rle": ((0.406, 0.457, 0.480), (1.0, 1.0, 1.0))}


class FeatureNormLinear(nn.Module):
    """``y = x W^T / ||x||_2 + b`` (``norm=True``) or ``x W^T + b``: the official RLE ``Linear``.

    Args:
        in_features, out_features: sizes.
        norm: divide by the input's L2 norm (per row) before adding the bias.
        gain: xavier-uniform gain of the weight (0.01 in the official code); the bias keeps PyTorch's init.
    """

    def __init__(self, in_features: int, out_features: int, norm: bool = True, gain: float = 0.01) -> None:
        super().__init__()
        self.norm = norm
        self.linear = nn.Linear(in_features, out_features)
        nn.init.xavier_uniform_(self.linear.weight, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.linear.weight.t()
        if self.norm:
            # A zero feature (all-ReLU-dead crop) would divide by 0; the clamp keeps it finite.
            y = y / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        return y + self.linear.bias


class RLERegressor(nn.Module):
    """Top-down keypoint regressor: ``(B, 3, H, W)`` crops in [0, 1] -> normalised coordinates and sigmas.

    Args:
        backbone: timm model name (``resnet50`` in the paper's COCO results).
        num_keypoints: K.
        pretrained: load timm weights (False by default: nothing is downloaded).
        frozen_stages, frozen_bn: passed to :func:`~lit_tasks.models.backbone.build_backbone`.
        coord_norm: divide the coordinate head's product by the feature's L2 norm (the official ``Linear(norm=True)``);
            False: a plain linear layer, as mmpose's ``RLEHead``.
        input_normalization: ``"imagenet"`` or ``"rle"`` (the official code's, see :data:`INPUT_NORMALIZATIONS`).

    ``forward(images)`` returns ``{"coords": (B, K, 2), "sigma": (B, K, 2)}`` in fp32 (the heads run with
    autocast off: they are tiny and the loss wants fp32); ``coords`` are ``(x, y)`` normalised to the input
    (see :func:`normalized_to_pixels`). :meth:`predict` returns keypoints in input pixels and scores.
    ``self.backbone`` is the timm feature extractor (for channels_last and backbone learning-rate ratios).
    """

    def __init__(self, *, backbone: str = "resnet50", num_keypoints: int = 17, pretrained: bool = False,
                 frozen_stages: int = -1, frozen_bn: bool = False, coord_norm: bool = True,
                 input_normalization: str = "imagenet") -> None:
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"RLERegressor: num_keypoints must be >= 1, got {num_keypoints}")
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(f"RLERegressor: input_normalization must be one of {sorted(INPUT_NORMALIZATIONS)}, "
                             f"got {input_normalization!r}")
        self.num_keypoints = num_keypoints
        self.normalize = Normalize(*INPUT_NORMALIZATIONS[input_normalization])
        self.backbone = build_backbone(backbone, pretrained=pretrained, out_indices=(-1,),
                                       frozen_stages=frozen_stages, frozen_bn=frozen_bn)
        channels = self.backbone.feature_info.channels()[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_coord = FeatureNormLinear(channels, num_keypoints * 2, norm=coord_norm)
        self.fc_sigma = FeatureNormLinear(channels, num_keypoints * 2, norm=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feature = self.backbone(self.normalize(images))[-1]
        b = feature.shape[0]
        feature = self.pool(feature).flatten(1)
        with torch.autocast(device_type=images.device.type, enabled=False):
            feature = feature.float()
            coords = self.fc_coord(feature).view(b, self.num_keypoints, 2)
            sigma = self.fc_sigma(feature).view(b, self.num_keypoints, 2).sigmoid()
        return {"coords": coords, "sigma": sigma}

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(keypoints (B, K, 2) in input pixels, scores (B, K))`` for crops ``(B, 3, H, W)`` in [0, 1]."""
        out = self(images)
        return normalized_to_pixels(out["coords"], images.shape[-2:]), keypoint_scores(out["sigma"])


def keypoint_scores(sigma: Tensor) -> Tensor:
    """Per-keypoint confidence ``mean_d (1 - sigma_d)``: ``(B, K, 2)`` -> ``(B, K)`` (official ``maxvals``)."""
    return (1 - sigma).mean(dim=-1)


def pixels_to_normalized(points: Tensor, image_size: tuple[int, int] | torch.Size) -> Tensor:
    """Crop pixels -> regression targets: ``x / W - 0.5, y / H - 0.5`` for ``(..., 2)`` points, ``image_size = (H, W)``.

    The official target (``_integral_target_generator``); the inverse of :func:`normalized_to_pixels`.
    """
    h, w = int(image_size[0]), int(image_size[1])
    return points / points.new_tensor([w, h]) - 0.5


def normalized_to_pixels(coords: Tensor, image_size: tuple[int, int] | torch.Size) -> Tensor:
    """Normalised coordinates -> crop pixels: ``(x + 0.5) W, (y + 0.5) H``, ``image_size = (H, W)``.

    The official decoding (``heatmap_to_coord`` with ``HEATMAP2COORD: coord``).
    """
    h, w = int(image_size[0]), int(image_size[1])
    return (coords + 0.5) * coords.new_tensor([w, h])


def flip_back_normalized(coords: Tensor, flip_index: list[int] | Tensor, width: int) -> Tensor:
    """Map predictions made on a horizontally mirrored crop back to the original crop (flip test).

    In pixels the mirror is ``x -> W - 1 - x`` (the official ``flip_joints_3d`` convention), which in
    normalised coordinates is ``x -> -x - 1 / W`` (the official ``flip_coord`` with ``shift=False``); the
    keypoints are then reordered with ``flip_index`` (``flip_index[k]`` = the keypoint that ``k`` becomes under
    a mirror, e.g. left_wrist <-> right_wrist). Works for ``(B, K, 2)`` coords; sigmas are reordered with
    ``tensor[:, flip_index]`` alone.
    """
    out = coords[:, flip_index].clone()
    out[..., 0] = -out[..., 0] - 1.0 / width
    return out


class KeypointPredictor(nn.Module):
    """The inference graph of a top-down regressor: crops -> ``(B, K, 3)`` = crop-pixel ``x, y`` and score.

    With ``flip_index`` it runs the flip test (the official ``flip_test``; mmpose ``test_cfg.flip_test``): the
    network also sees the mirrored crop; its coordinates, mapped back by :func:`flip_back_normalized`, and its
    sigmas, reordered by ``flip_index``, are averaged with the plain pass's before decoding -- the official
    code averages ``pred_jts`` and ``maxvals`` the same way. No flow: inference is the same graph whatever
    loss trained the network. One tensor out, so ``tools/export.py`` exports it as it is.

    Args:
        model: an :class:`RLERegressor` (or any module returning ``{"coords", "sigma"}`` of shape ``(B, K, 2)``).
        flip_index: keypoint permutation under a mirror; None disables the flip test.
    """

    def __init__(self, model: nn.Module, flip_index: list[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.flip_index = None if flip_index is None else [int(i) for i in flip_index]

    def normalized(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(coords, sigma)``, both ``(B, K, 2)``: normalised coordinates and scales, flip-averaged if enabled."""
        out = self.model(images)
        if self.flip_index is None:
            return out["coords"], out["sigma"]
        return merge_flipped(out, self.model(images.flip(-1)), self.flip_index, images.shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        coords, sigma = self.normalized(images)
        return torch.cat([normalized_to_pixels(coords, images.shape[-2:]), keypoint_scores(sigma)[..., None]], dim=-1)


def merge_flipped(out: dict[str, Tensor], out_flipped: dict[str, Tensor], flip_index: list[int],
                  width: int) -> tuple[Tensor, Tensor]:
    """Average a plain pass and a pass on the mirrored crop: ``(coords, sigma)`` ``(B, K, 2)`` (flip test)."""
    coords = (out["coords"] + flip_back_normalized(out_flipped["coords"], flip_index, width)) / 2
    sigma = (out["sigma"] + out_flipped["sigma"][:, flip_index]) / 2
    return coords, sigma
