"""Backbones: one builder over ``timm.create_model(features_only=True)``.

Heads are sized from ``backbone.feature_info.channels()`` / ``.reduction()``, never from tables.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn


def build_backbone(
    name: str,
    pretrained: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    output_stride: int | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm feature extractor returning the feature maps at ``out_indices``.

    Args:
        name: any timm model name that supports ``features_only`` (``resnet50``, ``resnet18``, ...).
        pretrained: load timm weights (needs the hub; False by default so nothing is downloaded).
        out_indices: which stages to return; for ResNets index i has stride 2**(i+1).
        output_stride: 8 or 16 for dilated (atrous) last stages, as DeepLab uses; None keeps 32.
    """
    kwargs = dict(features_only=True, out_indices=tuple(out_indices), pretrained=pretrained, **timm_kwargs)
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"backbone {name!r}: {err}") from err
