"""VarifocalNet's star-shaped 3x3 deformable convolution as a weighted row gather and one 1x1 convolution.

VFNet (Zhang et al. 2021, §3.2, Fig. 3) gives a 3x3 deformable convolution offsets that make tap (i, j) of the
location (h, w) sample the point (h + y_i, w + x_j) with y in (-t, 0, b) and x in (-l, 0, r), the star of that
location's own initial box. A general deformable convolution (``torchvision.ops.deform_conv2d``) builds an im2col
buffer per call through a custom kernel whose CPU backward is slow; with these offsets the same computation is

    cols[b, h, w, k, :] = bilinear(x[b, :], h + y_i, w + x_j)      (k = 3i + j, zero outside the map)
    out = conv1x1(cols as (B, 9C, H, W) channels_last, weight in (O, 3, 3, C) order)

The star needs fewer than the 36 neighbours of nine bilinear samples: the centre tap is the cell itself, the four
edge taps move along one axis only (2 neighbours each) and only the four corners are bilinear (4 each), 25 in all.
So the gather is one ``embedding_bag`` (sum mode, per-sample weights) over the map's rows of C channels (NHWC),
25 weighted rows a location, which writes ``cols`` channels_last, where the 1x1 convolution is fastest on CPU;
autograd gives the input, weight and box-distance gradients (the last through the bilinear weights).

Conventions matched to ``deform_conv2d`` (torchvision ``bilinear_interpolate``): a point is in pixel coordinates
(the centre of cell (h, w) is (h, w)); each of its integer neighbours contributes its bilinear weight if it lies
inside the map and zero otherwise, so a point at or beyond one cell outside the map reads zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Neighbours of tap (i, j) = neighbours of row tap i x those of column tap j: 2 x 2 at a corner, 2 x 1 or 1 x 2 on an
# edge, 1 at the centre; the gather's bags in tap order (row-major, the order of ``weight[:, :, i, j]``).
_BAG_SIZES = (4, 2, 4, 2, 1, 2, 4, 2, 4)
_PER_LOCATION = sum(_BAG_SIZES)


def _neighbours(pos: Tensor, before: Tensor, after: Tensor, size: int) -> list[list[tuple[Tensor, Tensor | None]]]:
    """The integer neighbours of one axis' three taps ``pos - before``, ``pos``, ``pos + after``.

    Args:
        pos: cell positions along the axis, (1, H, 1) for rows or (1, 1, W) for columns.
        before, after: (B, H, W) distances along the axis, in cells.
        size: the map's length along the axis.

    Returns:
        Per tap, a list of (index clamped into [0, size), linear weight zeroed outside the map): floor and floor + 1
        for a shifted tap, or the cell itself with weight None (exactly 1) for the middle tap.
    """
    taps: list[list[tuple[Tensor, Tensor | None]]] = []
    for point in (pos - before, None, pos + after):
        if point is None:
            taps.append([(pos.long(), None)])
            continue
        low = point.floor()
        frac = point - low
        low = low.long()
        taps.append([(i.clamp(0, size - 1), torch.where((i >= 0) & (i < size), wt, 0.0))
                     for i, wt in ((low, 1 - frac), (low + 1, frac))])
    return taps


def star_gather(x: Tensor, ltrb: Tensor) -> Tensor:
    """The 9 bilinear star samples of every location, channels last.

    Args:
        x: (B, C, H, W) features, float32 or float64 (any memory format).
        ltrb: (B, 4, H, W) distances (l, t, r, b) to the box sides in feature cells, in ``x``'s dtype.

    Returns:
        (B, H, W, 9, C): ``[b, h, w, 3i + j, c]`` = x[b, c] bilinearly sampled at (h + y_i, w + x_j), y in (-t, 0, b),
        x in (-l, 0, r), zero outside the map; differentiable in ``x`` and ``ltrb``.
    """
    b, c, h, w = x.shape
    left, top, right, bottom = ltrb.unbind(1)
    rows = _neighbours(torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1), top, bottom, h)
    cols = _neighbours(torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w), left, right, w)
    image = (torch.arange(b, device=x.device) * (h * w)).view(b, 1, 1)
    index, weight = [], []
    for i in range(3):
        for j in range(3):
            for row, wy in rows[i]:
                for col, wx in cols[j]:
                    index.append((image + row * w + col).expand(b, h, w))
                    wt = wy if wx is None else (wx if wy is None else wy * wx)
                    weight.append(torch.ones_like(left) if wt is None else wt.expand(b, h, w))
    index = torch.stack(index, -1).view(-1)  # (B * H * W * 25,), bags of _BAG_SIZES per location
    weight = torch.stack(weight, -1).view(-1)
    starts = torch.tensor(_BAG_SIZES, device=x.device).cumsum(0) - torch.tensor(_BAG_SIZES, device=x.device)
    offsets = (starts + _PER_LOCATION * torch.arange(b * h * w, device=x.device)[:, None]).view(-1)
    table = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # NHWC rows; a copy only for NCHW input
    samples = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)
    return samples.view(b, h, w, 9, c)


def star_conv3x3(x: Tensor, ltrb: Tensor, weight: Tensor) -> Tensor:
    """A 3x3 deformable convolution (stride 1, padding 1, no bias) whose taps sample each location's box star.

    Equals ``deform_conv2d(x, star_dcn_offsets(ltrb), weight, padding=(1, 1))`` (``lit_tasks.models.detection.vfnet``)
    up to rounding, with gradients for ``x``, ``ltrb`` and ``weight``.

    Args:
        x: (B, C, H, W) features.
        ltrb: (B, 4, H, W) distances (l, t, r, b) to the box sides in feature cells (pixels / stride).
        weight: (O, C, 3, 3) kernel, tap (i, j) at ``weight[:, :, i, j]``.

    Returns:
        (B, O, H, W), channels_last. The sampling runs in float32 (or float64 for float64 inputs) so the
        coordinates keep their digits; the 1x1 convolution runs in the dtype autocast chooses for it.
    """
    b, c, h, w = x.shape
    if ltrb.shape != (b, 4, h, w):
        raise ValueError(f"star_conv3x3: ltrb must be {(b, 4, h, w)} for features {tuple(x.shape)}, "
                         f"got {tuple(ltrb.shape)}")
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"star_conv3x3: weight must be (O, {c}, 3, 3), got {tuple(weight.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        samples = star_gather(x.to(dtype), ltrb.to(dtype))
    # (B, H, W, 9C) memory read as a channels_last (B, 9C, H, W): channel k * C + c, weight's (O, 3, 3, C) order.
    cols = samples.view(b, h, w, 9 * c).permute(0, 3, 1, 2)
    kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c, 1, 1)
    if not torch.is_autocast_enabled(x.device.type):  # autocast casts both operands itself
        cols, kernel = cols.to(x.dtype), kernel.to(x.dtype)
    return F.conv2d(cols, kernel)
