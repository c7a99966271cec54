"""Backbones: one builder over ``timm.create_model(features_only=True)``, input normalisation and freezing.

Heads are sized from ``backbone.feature_info.channels()`` / ``.reduction()``, never from tables. Every
network takes images in [0, 1] and normalises them itself (:class:`Normalize`), so a trained or exported
network needs no preprocessing constants from elsewhere.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.utils.model import freeze, freeze_batch_norm_2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm's freeze() puts in

from lit_tasks.models.conv_bn_fold import fold_frozen_batch_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FrozenBN = bool | Literal["statistics"]  # what ``frozen_bn`` takes


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    output_stride: int | None = None,
    frozen_stages: int = -1,
    frozen_bn: FrozenBN = False,
    fold_frozen_bn: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm feature extractor returning the feature maps at ``out_indices``.

    Args:
        name: any timm model name that supports ``features_only`` (``resnet50``, ``resnet18``, ...).
        pretrained: load timm weights (needs the hub; False by default so nothing is downloaded).
        out_indices: which stages to return; for ResNets index i has stride 2**(i+1).
        output_stride: 8 or 16 for dilated (atrous) last stages, as DeepLab uses; None keeps 32.
        frozen_stages, frozen_bn, fold_frozen_bn: see :func:`freeze_backbone`.
    """
    kwargs = dict(features_only=True, out_indices=tuple(out_indices), pretrained=pretrained, **timm_kwargs)
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    try:
        backbone = timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"backbone {name!r}: {err}") from err
    return freeze_backbone(backbone, frozen_stages, frozen_bn, fold_frozen_bn=fold_frozen_bn)


def freeze_backbone(backbone: nn.Module, frozen_stages: int = -1, frozen_bn: FrozenBN = False, *,
                    fold_frozen_bn: bool = True) -> nn.Module:
    """Freeze the stem and first stages and/or the BatchNorms, as detection recipes do with pretrained weights.

    ``frozen_stages`` follows mmdet's ResNet: -1 freezes nothing, 0 the stem, k the stem and the first k
    stages (timm feature levels 0..k: level 0 is the stride-2 stem of a ResNet). Frozen parts get
    ``requires_grad=False`` and their BatchNorms become ``FrozenBatchNorm2d`` (fixed statistics and affine,
    whatever ``train()`` says). ``frozen_bn`` for the BatchNorms of the rest:

    * ``True``: ``FrozenBatchNorm2d`` too, statistics and affine fixed (mmdet ``norm_eval=True`` with
      ``norm_cfg.requires_grad=False``: FCOS's caffe ResNet; DETR's FrozenBatchNorm2d);
    * ``"statistics"``: :class:`FrozenStatisticsBatchNorm2d`, running statistics fixed, weight and bias trained
      (mmdet ``norm_eval=True`` with ``requires_grad=True``: VFNet's recipe);
    * ``False``: ordinary BatchNorm.

    With 2 images per device, batch statistics are noise. Works on timm ``features_only`` models (ModuleDict-like,
    children in forward order).

    ``fold_frozen_bn`` (default True): every ``FrozenBatchNorm2d`` that follows a convolution (a ResNet's all) is
    folded into it (:mod:`lit_tasks.models.conv_bn_fold`): the same function and state dict, one elementwise pass
    over each activation map fewer in forward and backward. False keeps the separate BatchNorm modules.
    """
    if frozen_bn not in (True, False, "statistics"):
        raise ValueError(f"frozen_bn must be true, false or 'statistics', got {frozen_bn!r}")
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
    if frozen_bn == "statistics":
        freeze_batch_norm_statistics(backbone)
    elif frozen_bn:
        freeze_batch_norm_2d(backbone)  # FrozenBatchNorm2d holds buffers only: nothing left to train there
    if fold_frozen_bn:
        fold_frozen_batch_norm(backbone)
    return backbone


class FrozenStatisticsBatchNorm2d(nn.Module):
    """BatchNorm2d normalising with its running statistics in training too, which never change; the affine weight and
    bias are Parameters that train (mmdet ``norm_eval=True`` with ``norm_cfg=dict(type='BN', requires_grad=True)``).

    Not a ``_BatchNorm`` subclass, so ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm``)
    leaves it alone; its state dict is a BatchNorm2d's (``num_batches_tracked`` is dropped on loading, as torchvision's
    ``FrozenBatchNorm2d`` does).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> "FrozenStatisticsBatchNorm2d":
        """A copy of ``bn``'s statistics, affine (identity without one) and ``requires_grad``."""
        out = cls(bn.num_features, bn.eps).to(device=bn.running_mean.device)
        with torch.no_grad():
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            if bn.affine:
                out.weight.copy_(bn.weight)
                out.bias.copy_(bn.bias)
                out.weight.requires_grad_(bn.weight.requires_grad)
                out.bias.requires_grad_(bn.bias.requires_grad)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm_statistics(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a :class:`FrozenStatisticsBatchNorm2d` (in place).

    Raises:
        ValueError: a BatchNorm of another kind (e.g. timm's ``BatchNormAct2d``), naming it: its forward is more than
            a normalisation, so it is not silently replaced.
    """
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenStatisticsBatchNorm2d.from_batch_norm(child))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"frozen_bn='statistics' replaces nn.BatchNorm2d layers; {name!r} is a "
                             f"{type(child).__name__} (use frozen_bn=true or false with this backbone)")
        elif not isinstance(child, (FrozenBatchNorm2d, FrozenStatisticsBatchNorm2d)):
            freeze_batch_norm_statistics(child)
    return module


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
