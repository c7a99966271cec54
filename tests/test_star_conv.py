"""The star-shaped convolution equals ``torchvision.ops.deform_conv2d`` with VFNet's star offsets.

Tolerances come from the arithmetic, not from observed errors. A float32 sum of n products errs by at most about
n * u * (sum of the |products|) (Higham's gamma_n, u = 2^-24), whatever the order of the sum; both implementations
are compared to a float64 ``deform_conv2d`` (exact at this scale), each within that bound, with the sum of |products|
computed in float64 from |inputs| (bilinear weights are >= 0, so the same computation on |x|, |w|, |grad| gives it).
The sampling coordinates add one more term: a coordinate p = h - t (or w + r, ...) is rounded once, to within
u (size + |p|) cells (the bound below allows 4 u (size + |p|), room for an implementation that normalises p and
back), which moves a bilinear sample by at most that times the largest difference of neighbouring pixels
(<= 2 max|x|).
In bf16 autocast the 1x1 convolution rounds its operands to bf16 (8-bit mantissa, u = 2^-8 each) and its output
too, so the bound is 3 * 2^-8 of the sum of |products| plus the float32 terms.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from lit_tasks.models.detection.vfnet import DeformConv3x3, star_dcn_offsets
from lit_tasks.ops.star_conv import star_conv3x3, star_gather

U32 = 2.0 ** -24
UBF16 = 2.0 ** -8


def _case(b: int, c: int, o: int, h: int, w: int, reach: float, seed: int = 0):
    """Features, box distances reaching up to ``reach`` map sizes (so many taps fall outside), weight, out-grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    ltrb = torch.rand(b, 4, h, w, generator=g) * reach * max(h, w)
    weight = torch.randn(o, c, 3, 3, generator=g) * 0.1
    grad = torch.randn(b, o, h, w, generator=g)
    return x, ltrb, weight, grad


def _run(fn, x, ltrb, weight, grad, dtype=torch.float32, autocast: bool = False):
    """Output and gradients of (x, ltrb, weight) of ``fn`` in ``dtype``, all returned in float64."""
    leaves = [t.to(dtype).requires_grad_() for t in (x, ltrb, weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [t.double() for t in (out, *grads)]


def _deform(x, ltrb, weight):
    return deform_conv2d(x, star_dcn_offsets(ltrb), weight, padding=(1, 1))


def _bounds(x, ltrb, weight, grad, rel: float):
    """Per-element error bounds of (out, grad x, grad ltrb, grad weight) for a float32 result, with ``rel`` the
    relative rounding of the products' operands (0 in float32, 3 * 2^-8 in bf16 autocast)."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    # sums of |products| of each output / gradient element: the same computation on absolute values, in float64
    s_out, s_x, _, s_w = _run(_deform, x.abs(), ltrb, weight.abs(), grad.abs(), dtype=torch.float64)
    n_out, n_x, n_w = 9 * c, 9 * o * b * h * w, b * h * w  # terms of the longest sum of each
    # coordinate rounding: <= 4 u (size + |p|) cells, times <= 2 max|x| per cell, times sum |w| over the 9C taps
    dp = 4 * U32 * (max(h, w) + ltrb.abs().max().item() + 1)  # cells; it moves each bilinear weight by <= dp
    coord = dp * 2 * x.abs().max().item()
    w_abs = weight.abs().sum((1, 2, 3)).view(1, o, 1, 1).double()
    # d out / d ltrb: per location sum over o, c of |g| |w| times a pixel difference (<= 2 max|x|), 3 taps per side
    s_ltrb = (grad.abs().double() * w_abs).sum(1, keepdim=True) * 2 * x.abs().max().item()
    bound_out = (n_out * U32 + rel) * s_out + coord * w_abs
    # a moved bilinear weight also changes what the gradients of x and the weight receive, by dp per sample
    bound_x = (n_x * U32 + rel) * s_x + dp * grad.abs().sum().item() * weight.abs().sum(0).max().item()
    bound_ltrb = (3 * 9 * c * o * U32 + rel) * s_ltrb.expand(b, 4, h, w)
    bound_w = (n_w * U32 + rel) * s_w + dp * (grad.abs().sum((0, 2, 3)) * x.abs().max()).view(o, 1, 1, 1).double()
    return bound_out, bound_x, bound_ltrb, bound_w


def _assert_within(name: str, got, want, bound) -> float:
    err = (got - want).abs()
    over = err > bound  # exact zeros (taps wholly outside the map) have a zero bound and must stay exact
    assert not over.any(), (f"{name}: error {err[over].max().item():.3g} exceeds its bound "
                            f"{bound[over].max().item():.3g}")
    return err.max().item()


NAMES = ("output", "grad x", "grad ltrb", "grad weight")


@pytest.mark.parametrize(("shape", "reach"), [
    ((2, 8, 5, 7, 9), 0.3),  # mostly inside the map
    ((2, 8, 5, 7, 9), 1.5),  # most corner taps outside: zero padding, and points within one cell of the border
    ((1, 4, 3, 1, 1), 2.0),  # a 1x1 map (P7 of a small image)
    ((2, 16, 6, 3, 12), 0.8),
])
def test_star_conv_equals_deform_conv2d_in_float32(shape, reach) -> None:
    x, ltrb, weight, grad = _case(*shape, reach=reach)
    want = _run(_deform, x, ltrb, weight, grad, dtype=torch.float64)
    bounds = _bounds(x, ltrb, weight, grad, rel=0.0)
    star = _run(star_conv3x3, x, ltrb, weight, grad)
    dcn = _run(_deform, x, ltrb, weight, grad)
    for name, s, d, ref, bound in zip(NAMES, star, dcn, want, bounds):
        _assert_within(f"star {name}", s, ref, bound)
        _assert_within(f"deform_conv2d {name}", d, ref, bound)
    if reach >= 1.5:  # the case really samples at least one cell outside the map (where the output reads zero)
        h, w = shape[3:]
        col, row = torch.arange(w).float(), torch.arange(h).float()[:, None]
        outside = ((ltrb[:, 0] >= col + 1) | (ltrb[:, 2] >= w - col) | (ltrb[:, 1] >= row + 1)
                   | (ltrb[:, 3] >= h - row))
        assert outside.float().mean() > 0.3


def test_star_conv_in_bf16_autocast_on_cpu() -> None:
    x, ltrb, weight, grad = _case(2, 16, 8, 6, 10, reach=0.8)
    want = _run(_deform, x, ltrb, weight, grad, dtype=torch.float64)
    got = _run(star_conv3x3, x, ltrb, weight, grad, autocast=True)
    for name, g, ref, bound in zip(NAMES, got, want, _bounds(x, ltrb, weight, grad, rel=3 * UBF16)):
        _assert_within(f"bf16 star {name}", g, ref, bound)


def test_star_conv_on_bf16_tensors() -> None:
    """bf16 features, distances and weight (no autocast): sampled in float32, the 1x1 convolution in bf16, gradients
    returned in bf16; against float64 on the same (bf16-representable) inputs, within 3 bf16 roundings."""
    x, ltrb, weight, grad = (t.bfloat16().double() for t in _case(2, 16, 8, 6, 10, reach=1.5))
    want = _run(_deform, x, ltrb, weight, grad, dtype=torch.float64)
    got = _run(star_conv3x3, x, ltrb, weight, grad, dtype=torch.bfloat16)
    for name, g, ref, bound in zip(NAMES, got, want, _bounds(x, ltrb, weight, grad, rel=3 * UBF16)):
        _assert_within(f"bf16 tensors star {name}", g, ref, bound)


def test_star_conv_float64_matches_deform_conv2d_closely() -> None:
    x, ltrb, weight, grad = _case(2, 8, 5, 7, 9, reach=1.0)
    for got, want in zip(_run(star_conv3x3, x, ltrb, weight, grad, dtype=torch.float64),
                         _run(_deform, x, ltrb, weight, grad, dtype=torch.float64)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_vfnet_module_uses_the_star_path_on_cpu_and_deform_conv2d_when_traced() -> None:
    torch.manual_seed(0)
    module = DeformConv3x3(8, 4)
    x, ltrb = torch.randn(1, 8, 5, 6), torch.rand(1, 4, 5, 6) * 3
    assert "cpu" in DeformConv3x3.STAR_DEVICES
    torch.testing.assert_close(module(x, ltrb), module.deform(x, star_dcn_offsets(ltrb)), rtol=0, atol=1e-5)
    traced = torch.jit.trace(module, (x, ltrb))
    assert "deform_conv2d" in str(traced.inlined_graph) and "embedding_bag" not in str(traced.inlined_graph)


def test_star_conv_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="ltrb must be"):
        star_conv3x3(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 4), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="weight must be"):
        star_conv3x3(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), torch.zeros(1, 3, 3, 3))


def test_star_gather_at_whole_cells_is_the_shifted_map_with_zeros_outside() -> None:
    """Integer distances make every bilinear weight exactly 0 or 1: each tap is x shifted by whole cells, exactly."""
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 3, 5, 6
    x = torch.randn(b, c, h, w, generator=g)
    ltrb = torch.randint(0, 7, (b, 4, h, w), generator=g).float()  # up to 6 cells: many taps leave the map
    got = star_gather(x, ltrb)
    assert got.shape == (b, h, w, 9, c)
    padded = torch.zeros(b, c, h + 14, w + 14)
    padded[:, :, 7:7 + h, 7:7 + w] = x
    left, top, right, bottom = ltrb.long().unbind(1)
    for bi in range(b):
        for hi in range(h):
            for wi in range(w):
                ys = (-top[bi, hi, wi], 0, bottom[bi, hi, wi])
                xs = (-left[bi, hi, wi], 0, right[bi, hi, wi])
                want = torch.stack([padded[bi, :, 7 + hi + dy, 7 + wi + dx] for dy in ys for dx in xs])
                assert torch.equal(got[bi, hi, wi], want)


def test_star_conv_output_is_channels_last_and_the_centre_tap_is_the_cell_itself() -> None:
    """With only the centre tap weighted the star conv is a 1x1 convolution of x, whatever the distances."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    ltrb = torch.rand(2, 4, 5, 7, generator=g, dtype=torch.float64) * 9
    weight = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    weight[:, :, 1, 1] = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = star_conv3x3(x, ltrb, weight)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight[:, :, 1:2, 1:2]), rtol=0, atol=1e-12)
