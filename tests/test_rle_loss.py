"""RLE loss against direct NumPy formulas of the official and mmpose variants, masking, mixed precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_tasks.losses.rle import CoordinateL1Loss, RLELoss, coordinate_l1_loss, rle_loss


def _np_flow_log_prob(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """NumPy port of the official ``RealNVP.log_prob`` (``backward_p`` + 2-D standard normal prior)."""
    w = {k: v.detach().double().numpy() for k, v in state.items()}
    mask = w["mask"]

    def mlp(prefix: str, h: np.ndarray, tanh: bool) -> np.ndarray:
        for j, layer in enumerate((0, 2, 4)):
            h = h @ w[f"{prefix}.{layer}.weight"].T + w[f"{prefix}.{layer}.bias"]
            if j < 2:
                h = np.where(h > 0, h, 0.01 * h)  # LeakyReLU(0.01)
        return np.tanh(h) if tanh else h

    z, log_det = x.copy(), np.zeros(len(x))
    for i in reversed(range(len(mask))):
        m = mask[i]
        kept = m * z
        s = mlp(f"s.{i}", kept, True) * (1 - m)
        t = mlp(f"t.{i}", kept, False) * (1 - m)
        z = (1 - m) * (z - t) * np.exp(-s) + kept
        log_det -= s.sum(axis=1)
    return -0.5 * (z**2).sum(axis=1) - math.log(2 * math.pi) + log_det


def _np_official(state, pred, sigma, gt, vis):
    """Official RegressFlow.forward nf_loss + RLELoss.forward (criterion.py), weights = visibility per axis."""
    b, k, _ = pred.shape
    bar_mu = (pred - gt) / sigma
    log_phi = _np_flow_log_prob(state, bar_mu.reshape(-1, 2)).reshape(b, k, 1)
    w = np.repeat(vis[..., None], 2, axis=2).astype(np.float64)
    nf_loss = (np.log(sigma) - log_phi) * w[:, :, :1]
    amp = 1 / math.sqrt(2 * math.pi)
    q = (np.log(sigma / amp) + np.abs(gt - pred) / (math.sqrt(2) * sigma + 1e-9)) * w
    return (nf_loss + q).sum() / b


def _np_mmpose(state, pred, sigma, gt, vis, q_dis):
    """mmpose RLELoss.forward(use_target_weight=True, size_average=True, residual=True)."""
    b, k, _ = pred.shape
    error = (pred - gt) / (sigma + 1e-9)
    log_phi = _np_flow_log_prob(state, error.reshape(-1, 2)).reshape(b, k, 1)
    nf_loss = np.log(sigma) - log_phi
    if q_dis == "laplace":
        loss_q = np.log(sigma * 2) + np.abs(error)
    else:
        loss_q = np.log(sigma * math.sqrt(2 * math.pi)) + 0.5 * error**2
    loss = (nf_loss + loss_q) * vis[..., None]
    return (loss / len(loss)).sum()


def _inputs(seed: int = 0, b: int = 4, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, k, 2, generator=g, dtype=torch.float64) - 0.5
    gt = pred + 0.05 * torch.randn(b, k, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(b, k, 2, generator=g, dtype=torch.float64) * 0.3 + 0.01
    vis = torch.rand(b, k, generator=g) > 0.3
    vis[0, 0] = False
    return pred, sigma, gt, vis


def _loss(q: str, seed: int = 0) -> RLELoss:
    torch.manual_seed(seed)
    return RLELoss(q_distribution=q).double()


@pytest.mark.parametrize("q", ["official", "laplace", "gaussian"])
def test_matches_numpy_formula(q: str) -> None:
    crit = _loss(q)
    pred, sigma, gt, vis = _inputs()
    got = crit(pred, sigma, gt, vis).item()
    args = (crit.flow.state_dict(), pred.numpy(), sigma.numpy(), gt.numpy(), vis.numpy())
    want = _np_official(*args) if q == "official" else _np_mmpose(*args, q)
    assert abs(got - want) < 1e-6 * max(1.0, abs(want))


def test_variants_differ() -> None:
    """The three forms are not the same function (the test above would otherwise not tell them apart)."""
    pred, sigma, gt, vis = _inputs(1)
    values = [_loss(q)(pred, sigma, gt, vis).item() for q in ("official", "laplace", "gaussian")]
    assert min(abs(values[0] - values[1]), abs(values[0] - values[2]), abs(values[1] - values[2])) > 1e-2


def test_fp32_matches_fp64() -> None:
    """In fp32 the sum of 2BK ~ O(1) terms keeps ~1e-6 relative accuracy."""
    crit = _loss("official")
    pred, sigma, gt, vis = _inputs(2)
    want = crit(pred, sigma, gt, vis).item()
    got = crit.float()(pred.float(), sigma.float(), gt.float(), vis).item()
    assert abs(got - want) < 1e-5 * max(1.0, abs(want))


def test_masked_keypoints_do_not_contribute() -> None:
    """Changing an unlabelled keypoint's prediction / target (even to NaN) changes neither value nor gradients."""
    crit = _loss("official")
    pred, sigma, gt, vis = _inputs(3)
    pred = pred.clone().requires_grad_(True)
    base = crit(pred, sigma, gt, vis)
    base.backward()
    grad = pred.grad.clone()
    assert grad[~vis].abs().sum() == 0 and grad[vis].abs().sum() > 0
    gt2, sigma2 = gt.clone(), sigma.clone()
    gt2[~vis] = float("nan")
    sigma2[~vis] = 0.0  # log(0) = -inf at a masked keypoint
    pred.grad = None
    other = crit(pred, sigma2, gt2, vis)
    other.backward()
    assert other.item() == pytest.approx(base.item(), abs=1e-12)
    torch.testing.assert_close(pred.grad, grad)


def test_normalised_by_batch_size_not_visible_count() -> None:
    """Duplicating the batch keeps the value (sum / B); all-masked gives exactly 0 with a connected graph."""
    crit = _loss("official")
    pred, sigma, gt, vis = _inputs(4)
    one = crit(pred, sigma, gt, vis).item()
    two = crit(torch.cat([pred, pred]), torch.cat([sigma, sigma]), torch.cat([gt, gt]), torch.cat([vis, vis])).item()
    assert two == pytest.approx(one, rel=1e-12)
    p = pred.clone().requires_grad_(True)
    zero = crit(p, sigma, gt, torch.zeros_like(vis))
    assert zero.item() == 0.0
    zero.backward()
    assert p.grad is not None and p.grad.abs().sum() == 0
    assert all(q.grad is not None for q in crit.flow.parameters())  # every parameter reached (DDP-safe)


def test_float_weight_per_axis() -> None:
    """A (B, K, 2) weight equal on both axes gives the same as the (B, K) one."""
    crit = _loss("laplace")
    pred, sigma, gt, vis = _inputs(5)
    a = crit(pred, sigma, gt, vis).item()
    b = crit(pred, sigma, gt, vis[..., None].expand(-1, -1, 2).double()).item()
    assert a == pytest.approx(b, rel=1e-12)


def test_can_be_negative() -> None:
    """A confident, accurate prediction has density > 1: the loss is negative (expected, documented)."""
    crit = _loss("official")
    gt = torch.zeros(2, 3, 2, dtype=torch.float64)
    value = crit(gt + 1e-3, torch.full_like(gt, 0.01), gt, torch.ones(2, 3, dtype=torch.bool))
    assert value.item() < 0


def test_bf16_autocast_finite_and_fp32() -> None:
    torch.manual_seed(6)
    crit = RLELoss()
    head = torch.nn.Linear(8, 5 * 4)
    x = torch.randn(3, 8)
    gt = torch.rand(3, 5, 2) - 0.5
    vis = torch.ones(3, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x).view(3, 5, 4)
        assert out.dtype == torch.bfloat16
        value = crit(out[..., :2], out[..., 2:].sigmoid(), gt, vis)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in list(head.parameters()) + list(crit.parameters()))


def test_l1_loss() -> None:
    pred, sigma, gt, vis = _inputs(7)
    want = (np.abs(pred.numpy() - gt.numpy()) * vis.numpy()[..., None]).sum() / pred.shape[0]
    assert coordinate_l1_loss(pred, gt, vis).item() == pytest.approx(want, rel=1e-12)
    assert CoordinateL1Loss()(pred, None, gt, vis).item() == pytest.approx(want, rel=1e-12)


def test_bad_arguments() -> None:
    pred, sigma, gt, vis = _inputs(8)
    with pytest.raises(ValueError, match="q_distribution"):
        RLELoss(q_distribution="student")
    with pytest.raises(ValueError, match="weight"):
        rle_loss(pred, sigma, gt, vis[:, :2], RLELoss().double().flow.log_prob)
    with pytest.raises(ValueError, match="target"):
        coordinate_l1_loss(pred, gt[:, :2], vis)
