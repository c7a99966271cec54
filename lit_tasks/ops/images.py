"""Image batching helpers: zero padding of differently sized images, sliding windows over a large image."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def stack_padded(images: Sequence[torch.Tensor] | torch.Tensor, size_divisor: int = 1) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``(C, H_i, W_i)`` images -> ``(B, C, H, W)`` zero-padded bottom/right to a multiple of ``size_divisor``, and
    the unpadded ``(h, w)`` of each image. A ``(B, C, H, W)`` tensor is returned as it is, every image full size."""
    if torch.is_tensor(images) and images.ndim == 4:
        return images, [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
    if not len(images):
        raise ValueError("stack_padded: no images")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h = -(-max(s[0] for s in sizes) // size_divisor) * size_divisor
    w = -(-max(s[1] for s in sizes) // size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    return batch, sizes


def group_by_size(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (h, w), in first-seen order: images of one size batch without padding."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(i)
    return groups


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` windows of side ``crop`` every ``stride`` px covering the image; the last row and
    column are shifted back to end at the border, and a side shorter than ``crop`` gets one window."""
    def starts(size: int) -> list[int]:
        if size <= crop:
            return [0]
        n = math.ceil((size - crop) / stride) + 1
        return sorted({min(i * stride, size - crop) for i in range(n)})

    return [(y, min(y + crop, height), x, min(x + crop, width)) for y in starts(height) for x in starts(width)]
