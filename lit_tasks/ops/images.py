"""Image batching helpers: zero padding of differently sized images, sliding windows over a large image."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


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


def sizes_of(targets: Sequence[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """The unpadded (h, w) of each image of a batch, from its target's ``size``."""
    return [(int(t["size"][0]), int(t["size"][1])) for t in targets]


def group_by_size(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (h, w), in first-seen order: images of one size batch without padding."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(i)
    return groups


def padded_size(size: Sequence[int], size_divisor: int) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``size_divisor``: an image's size padded alone (mmdet ``Pad``)."""
    return tuple(-(-int(v) // size_divisor) * size_divisor for v in size)  # type: ignore[return-value]


def group_same_sizes(device: torch.device) -> bool:
    """Whether :func:`maps_as_if_alone` should run images of one padded size in one call on ``device``: not on a CPU,
    where one call per image was faster (benchmarks/detection_eval_batching.py, 2 cores, four 512x384 images: FCOS
    and VFNet R50 per image 2-17 % faster; batch-1 activations stay in cache), yes on an accelerator, which a
    batch of one leaves mostly idle."""
    return torch.device(device).type != "cpu"


def maps_as_if_alone(fn: Callable[[torch.Tensor, list[tuple[int, int]]], list[torch.Tensor]], images: torch.Tensor,
                     sizes: Sequence[tuple[int, int]], size_divisor: int, fills: Sequence[float], *,
                     group: bool = True) -> list[torch.Tensor]:
    """``fn``'s maps of each image of a padded batch as if alone: padded to its own multiple of ``size_divisor``.

    ``fn(images (n, C, H_g, W_g), their sizes)`` returns maps ``(n, c_j, h_j, w_j)``; it runs once per padded size
    (``group``) or once per image. Map j of the batch is ``(B, c_j, max h_j, max w_j)``, each image's own map at the
    top left and ``fills[j]`` around it, in batch order. mmdetection tests one image per GPU, so padding never
    depends on batch-mates: here neither do the maps (up to the float order of a batched kernel), whatever the batch.
    """
    sizes = [(int(h), int(w)) for h, w in sizes]
    padded = [padded_size(size, size_divisor) for size in sizes]
    groups = list(group_by_size(padded).items()) if group else [(size, [i]) for i, size in enumerate(padded)]

    def alone(index: list[int], h: int, w: int) -> list[torch.Tensor]:
        x = images if len(index) == images.shape[0] else images[index]
        x = x[..., :h, :w]  # the batch's padding beyond the image's own, or zero padding up to it
        x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) if x.shape[-2:] != (h, w) else x
        return fn(x, [sizes[i] for i in index])

    if len(groups) == 1:
        ((h, w), index), = groups
        return alone(index, h, w)
    parts = [(index, alone(index, h, w)) for (h, w), index in groups]
    if len(fills) != len(parts[0][1]):
        raise ValueError(f"maps_as_if_alone: {len(parts[0][1])} maps but {len(fills)} fill values")
    outs = []
    for j, fill in enumerate(fills):
        first = parts[0][1][j]
        height = max(maps[j].shape[-2] for _, maps in parts)
        width = max(maps[j].shape[-1] for _, maps in parts)
        out = first.new_full((len(sizes), first.shape[1], height, width), fill)
        for index, maps in parts:
            out[torch.tensor(index, device=out.device), :, : maps[j].shape[-2], : maps[j].shape[-1]] = maps[j]
        outs.append(out)
    return outs


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` windows of side ``crop`` every ``stride`` px covering the image; the last row and
    column are shifted back to end at the border, and a side shorter than ``crop`` gets one window."""
    def starts(size: int) -> list[int]:
        if size <= crop:
            return [0]
        n = math.ceil((size - crop) / stride) + 1
        return sorted({min(i * stride, size - crop) for i in range(n)})

    return [(y, min(y + crop, height), x, min(x + crop, width)) for y in starts(height) for x in starts(width)]
