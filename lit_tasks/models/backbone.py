"""Backbones: one builder over ``timm.create_model(features_only=True)``, input normalisation and freezing.

Heads are sized from ``backbone.feature_info.channels()`` / ``.reduction()``, never from tables. Every
network takes images in [0, 1] and normalises them itself (:class:`Normalize`), so a trained or exported
network needs no preprocessing constants from elsewhere.
"""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from timm.utils.model import freeze, freeze_batch_norm_2d
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(
    name: str,
    pretrained: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    output_stride: int | None = None,
    frozen_stages: int = -1,
    frozen_bn: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm feature extractor returning the feature maps at ``out_indices``.

    Args:
        name: any timm model name that supports ``features_only`` (``resnet50``, ``resnet18``, ...).
        pretrained: load timm weights (needs the hub; False by default so nothing is downloaded).
        out_indices: which stages to return; for ResNets index i has stride 2**(i+1).
        output_stride: 8 or 16 for dilated (atrous) last stages, as DeepLab uses; None keeps 32.
        frozen_stages, frozen_bn: see :func:`freeze_backbone`.
    """
    kwargs = dict(features_only=True, out_indices=tuple(out_indices), pretrained=pretrained, **timm_kwargs)
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    try:
        backbone = timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"backbone {name!r}: {err}") from err
    return freeze_backbone(backbone, frozen_stages, frozen_bn)


def freeze_backbone(backbone: nn.Module, frozen_stages: int = -1, frozen_bn: bool = False) -> nn.Module:
    """Freeze the stem and first stages and/or every BatchNorm, as detection recipes do with pretrained weights.

    ``frozen_stages`` follows mmdet's ResNet: -1 freezes nothing, 0 the stem, k the stem and the first k
    stages (timm feature levels 0..k: level 0 is the stride-2 stem of a ResNet). Frozen parts get
    ``requires_grad=False`` and their BatchNorms become ``FrozenBatchNorm2d`` (fixed statistics and affine,
    whatever ``train()`` says). ``frozen_bn`` does the latter to every BatchNorm of the backbone ("frozen
    BN", mmdet ``norm_eval=True`` + ``requires_grad=False``): with 2 images per device, batch statistics
    are noise. Works on timm ``features_only`` models (ModuleDict-like, children in forward order).
    """
    if frozen_stages >= 0:
        info = backbone.feature_info.info
        if frozen_stages >= len(info):
            raise ValueError(f"frozen_stages={frozen_stages}: this backbone has {len(info)} feature levels "
                             f"(0 = stem .. {len(info) - 1})")
        last = info[frozen_stages]["module"].split(".")[0]
        names = [n for n, _ in backbone.named_children()]
        if last not in names:
            raise ValueError(f"frozen_stages: module {last!r} of feature level {frozen_stages} is not a child of "
                             f"the backbone ({names})")
        freeze(backbone, names[: names.index(last) + 1])
    if frozen_bn:
        freeze_batch_norm_2d(backbone)  # FrozenBatchNorm2d holds buffers only: nothing left to train there
    return backbone


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel for ``(B, 3, H, W)`` images in [0, 1] (constants as non-saved buffers).

    With ``image_sizes`` (the unpadded (h, w) of each image of a zero-padded batch), the padding is zero *after*
    normalisation, as mmdet and torchvision pad: padding then looks like the mean colour, not like black.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, image_sizes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        height, width = x.shape[-2:]
        if image_sizes is not None and any((int(h), int(w)) != (height, width) for h, w in image_sizes):
            rows = torch.arange(height, device=x.device)
            cols = torch.arange(width, device=x.device)
            sizes = torch.as_tensor([[int(h), int(w)] for h, w in image_sizes], device=x.device)
            inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
            x = x * inside[:, None].to(x.dtype)
        return x
