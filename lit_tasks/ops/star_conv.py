"""VarifocalNet's star-shaped 3x3 deformable convolution as a bilinear gather and one matrix product.

VFNet (Zhang et al. 2021, §3.2, Fig. 3) gives a 3x3 deformable convolution offsets that make tap (i, j) of the
location (h, w) sample the point (h + y_i, w + x_j) with y in (-t, 0, b) and x in (-l, 0, r), the star of that
location's own initial box. A general deformable convolution (``torchvision.ops.deform_conv2d``) builds an im2col
buffer per call through a custom kernel whose CPU backward is slow; with these offsets the same computation is

    cols[b, c*9 + k, h, w] = bilinear(x[b, c], h + y_i, w + x_j)      (k = 3i + j, zero outside the map)
    out = conv1x1(cols, weight.reshape(O, 9C))

i.e. one ``grid_sample`` over 9 sampling grids and one 1x1 convolution: plain PyTorch ops, on every device, with
autograd for the input, the weight and the box distances.

Conventions matched to ``deform_conv2d`` (torchvision ``bilinear_interpolate``): a point is in pixel coordinates
(the centre of cell (h, w) is (h, w)); each of its four integer neighbours contributes its bilinear weight if it lies
inside the map and zero otherwise, so a point at or beyond one cell outside the map reads zero. ``grid_sample`` with
``padding_mode="zeros"`` treats out-of-map corners the same way; the normalisation uses ``align_corners=False``
(pixel p <-> (2p + 1) / size - 1) because it is defined for maps of size 1 too (VFNet's P7 of a small image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def star_sample_points(ltrb: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates of the 9 star taps of every location.

    Args:
        ltrb: (B, 4, H, W) distances (l, t, r, b) from each location to its box sides, in feature cells.

    Returns:
        ``(py, px)``, each (B, 3, 3, H, W): tap (i, j) of location (h, w) samples row ``py[:, i, j, h, w] = h + y_i``
        and column ``px[:, i, j, h, w] = w + x_j``, y in (-t, 0, b), x in (-l, 0, r).
    """
    b, _, h, w = ltrb.shape
    left, top, right, bottom = ltrb.unbind(1)
    zero = torch.zeros_like(left)
    rows = torch.arange(h, dtype=ltrb.dtype, device=ltrb.device).view(1, 1, h, 1)
    cols = torch.arange(w, dtype=ltrb.dtype, device=ltrb.device).view(1, 1, 1, w)
    ys = torch.stack([-top, zero, bottom], 1) + rows  # (B, 3, H, W)
    xs = torch.stack([-left, zero, right], 1) + cols
    return ys[:, :, None].expand(b, 3, 3, h, w), xs[:, None, :].expand(b, 3, 3, h, w)


def star_conv3x3(x: Tensor, ltrb: Tensor, weight: Tensor) -> Tensor:
    """A 3x3 deformable convolution (stride 1, padding 1, no bias) whose taps sample each location's box star.

    Equals ``deform_conv2d(x, star_dcn_offsets(ltrb), weight, padding=(1, 1))`` (``lit_tasks.models.detection.vfnet``)
    up to rounding, with gradients for ``x``, ``ltrb`` and ``weight``.

    Args:
        x: (B, C, H, W) features.
        ltrb: (B, 4, H, W) distances (l, t, r, b) to the box sides in feature cells (pixels / stride).
        weight: (O, C, 3, 3) kernel, tap (i, j) at ``weight[:, :, i, j]``.

    Returns:
        (B, O, H, W). The sampling runs in float32 (or float64 for float64 inputs) so the coordinates keep their
        digits; the 1x1 convolution runs in the dtype autocast chooses for it.
    """
    b, c, h, w = x.shape
    if ltrb.shape != (b, 4, h, w):
        raise ValueError(f"star_conv3x3: ltrb must be {(b, 4, h, w)} for features {tuple(x.shape)}, "
                         f"got {tuple(ltrb.shape)}")
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"star_conv3x3: weight must be (O, {c}, 3, 3), got {tuple(weight.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        py, px = star_sample_points(ltrb.to(dtype))
        # grid_sample's (x, y) in [-1, 1] with align_corners=False: p -> (2p + 1) / size - 1.
        grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)  # (B, 3, 3, H, W, 2)
        grid = grid.reshape(b, 9 * h, w, 2)
        cols = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # (B, C, 9H, W) is (B, C, 9, H, W) in memory: channel c * 9 + k, the order of weight.reshape(O, 9C).
    cols = cols.view(b, c * 9, h, w)
    kernel = weight.reshape(weight.shape[0], c * 9, 1, 1)
    if not torch.is_autocast_enabled(x.device.type):  # autocast casts both operands itself
        cols, kernel = cols.to(x.dtype), kernel.to(x.dtype)
    return F.conv2d(cols, kernel)
