"""RealNVP flow of RLE: change of variables, inverse, and the near-identity limit."""

from __future__ import annotations

import math

import pytest
import torch

from lit_tasks.losses.rle_flow import RealNVP


def _grid(half_width: float, n: int) -> tuple[torch.Tensor, float]:
    """Midpoints of an ``n x n`` grid on ``[-half_width, half_width]^2`` as ``(n*n, 2)`` and the cell side."""
    h = 2 * half_width / n
    g = (torch.arange(n, dtype=torch.float32) + 0.5) * h - half_width
    x, y = torch.meshgrid(g, g, indexing="xy")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1), h


def _std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (x * x).sum(dim=1) - math.log(2 * math.pi)


@pytest.mark.parametrize("seed, scale_mult", [(0, 1.0), (1, 1.0), (2, 1.0), (0, 1.5)])
def test_density_integrates_to_one(seed: int, scale_mult: float) -> None:
    """exp(log_prob) sums to 1 over a fine grid: a wrong log-det sign or term breaks this by far more than 1e-2.

    The official initialisation (PyTorch default Linear init) under three seeds, and one flow whose scale
    networks are made 1.5x steeper (log-scales spread further). The grid midpoint rule on [-8, 8]^2 with cell
    0.0625 converges to within 1e-5 of the 512^2 grid for these flows; their mass outside is negligible.
    """
    torch.manual_seed(seed)
    flow = RealNVP()
    with torch.no_grad():
        for net in flow.s:
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.mul_(scale_mult)
    points, h = _grid(8.0, 256)
    with torch.no_grad():
        log_p = flow.log_prob(points)
        z, log_det = flow.inverse(points)
    total = log_p.double().exp().sum().item() * h * h
    assert abs(total - 1.0) < 1e-2
    # The flow is far from the identity here: the same sum with the log-det sign flipped is off by > 0.2,
    # so the check above does test the Jacobian term.
    flipped = (_std_normal_log_prob(z) - log_det).double().exp().sum().item() * h * h
    assert abs(flipped - 1.0) > 0.2


def test_inverse_of_forward_map_is_identity() -> None:
    torch.manual_seed(3)
    flow = RealNVP().double()
    x = torch.randn(500, 2, dtype=torch.float64) * 3
    with torch.no_grad():
        z, _ = flow.inverse(x)
        back = flow.forward_map(z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)


def test_log_det_matches_autograd_jacobian() -> None:
    """log |det df/dx| of :meth:`RealNVP.inverse` equals the log-determinant of the autograd Jacobian."""
    torch.manual_seed(4)
    flow = RealNVP().double()
    for point in torch.randn(5, 2, dtype=torch.float64) * 2:
        jac = torch.autograd.functional.jacobian(lambda p: flow.inverse(p[None])[0][0], point)
        _, log_det = flow.inverse(point[None])
        assert abs(log_det.item() - torch.linalg.slogdet(jac).logabsdet.item()) < 1e-10


def test_near_zero_weights_give_standard_normal() -> None:
    """With every parameter ~1e-7, s and t are ~1e-7, so log_prob is log N(x; 0, I) to ~1e-6."""
    torch.manual_seed(5)
    flow = RealNVP().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1e-7)
    x = torch.randn(1000, 2, dtype=torch.float64) * 2
    torch.testing.assert_close(flow.log_prob(x), _std_normal_log_prob(x), atol=1e-5, rtol=0)


def test_mmpose_init_with_zero_biases_is_standard_normal_but_default_biases_are_not() -> None:
    """mmpose's xavier gain-0.01 weights make the flow ~identity only if the biases are also ~0.

    REFERENCE.md §8.7 says log_phi ~ log N at that init; the biases keep PyTorch's default uniform init in
    both the official code and mmpose, so that holds only roughly: the
    log-density differs by ~0.5 at |x| ~ 1 and by ~20 at |x| ~ 7 (documented in rle_flow.py).
    """
    torch.manual_seed(6)
    flow = RealNVP(xavier_gain=0.01).double()
    x = torch.randn(1000, 2, dtype=torch.float64) * 2
    with torch.no_grad():
        default_bias_gap = (flow.log_prob(x) - _std_normal_log_prob(x)).abs().max().item()
        for m in flow.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.zero_()
        zero_bias_gap = (flow.log_prob(x) - _std_normal_log_prob(x)).abs().max().item()
    assert zero_bias_gap < 1e-4  # |x| up to ~7: x . t with t ~ 1e-6 |x| over 6 couplings
    assert default_bias_gap > 1e-2


def test_state_dict_names_follow_the_official_flow() -> None:
    keys = set(RealNVP().state_dict())
    assert "mask" in keys and "s.0.0.weight" in keys and "t.5.4.bias" in keys and "s.5.4.weight" in keys
    assert torch.equal(RealNVP().mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 3))


def test_log_prob_is_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(7)
    flow = RealNVP()
    x = torch.randn(64, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow.log_prob(x.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, flow.log_prob(x.bfloat16().float()))


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        RealNVP().log_prob(torch.zeros(3, 3))
