"""Varifocal loss against a float64 NumPy closed form (REFERENCE.md §4.1, §4.6)."""

import math

import numpy as np
import pytest
import torch

from lit_tasks.losses.varifocal import varifocal_loss

# fp32 against a float64 oracle: every fp32 operation rounds to within 2**-24 relative; the loss is ~8
# operations deep (sigmoid, pow, abs, exp, log1p, products), so a few 1e-7 relative. 1e-6 relative leaves
# a factor >2 of margin; atol 1e-7 covers elements whose value underflows fp32 (negatives at logit -50).
RTOL, ATOL = 1e-6, 1e-7


def vfl_numpy(x: np.ndarray, q: np.ndarray, alpha=0.75, gamma=2.0, iou_weighted=True) -> np.ndarray:
    """Closed form in float64: BCE written in its overflow-free form, times the VFL weight."""
    x, q = x.astype(np.float64), q.astype(np.float64)
    bce = np.maximum(x, 0) - x * q + np.log1p(np.exp(-np.abs(x)))
    sig = np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))
    w = np.where(q > 0, q if iou_weighted else 1.0, alpha * np.abs(sig - q) ** gamma)
    return bce * w


def _random_case(seed: int, shape=(64, 5), pos_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    q = torch.rand(shape, generator=g) * 0.99 + 0.01  # IoU targets in (0.01, 1]
    q = torch.where(torch.rand(shape, generator=g) < pos_fraction, q, torch.zeros_like(q))
    return logits, q


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_matches_numpy_closed_form(iou_weighted):
    logits, q = _random_case(0)
    assert (q > 0).sum() > 10 and (q == 0).sum() > 100  # both branches are exercised
    got = varifocal_loss(logits, q, iou_weighted=iou_weighted, reduction="none")
    want = vfl_numpy(logits.numpy(), q.numpy(), iou_weighted=iou_weighted)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)
    # A sum of n fp32 terms adds at most n * 2**-24 relative (320 terms: 2e-5).
    total = varifocal_loss(logits, q, iou_weighted=iou_weighted, reduction="sum")
    np.testing.assert_allclose(total.item(), want.sum(), rtol=q.numel() * 2**-24)
    mean = varifocal_loss(logits, q, iou_weighted=iou_weighted, reduction="mean")
    np.testing.assert_allclose(mean.item(), want.mean(), rtol=q.numel() * 2**-24)


def test_hand_computed_values_alpha_weights_negatives():
    logits = torch.tensor([0.0, 0.0, 0.0])
    q = torch.tensor([0.0, 0.5, 1.0])
    got = varifocal_loss(logits, q, reduction="none")
    # logit 0: sigmoid 0.5, BCE = ln 2 for every q in {0, 0.5, 1} ( -q ln .5 - (1-q) ln .5 ).
    ln2 = math.log(2)
    want = [0.75 * 0.25 * ln2, 0.5 * ln2, 1.0 * ln2]  # negative: alpha * 0.5**2; positives: q (not alpha)
    assert torch.allclose(got, torch.tensor(want), rtol=RTOL, atol=0)


@pytest.mark.parametrize("scale", [50.0, 100.0, 1e4])
def test_extreme_logits_are_finite_and_exact(scale):
    logits = torch.tensor([scale, -scale, scale, -scale, scale, -scale], requires_grad=True)
    q = torch.tensor([0.0, 0.0, 0.8, 0.8, 1.0, 1.0])
    loss = varifocal_loss(logits, q, reduction="none")
    assert torch.isfinite(loss).all()
    np.testing.assert_allclose(loss.detach().numpy(), vfl_numpy(logits.detach().numpy(), q.numpy()),
                               rtol=RTOL, atol=ATOL)
    # A confident wrong negative costs alpha * |logit|; a confident right negative nothing.
    assert loss[0].item() == pytest.approx(0.75 * scale, rel=RTOL)
    assert loss[1].item() == pytest.approx(0.0, abs=ATOL)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # d/dp of q * BCE for a positive at a huge logit is q * (sigmoid(p) - q): finite and exact.
    assert logits.grad[2].item() == pytest.approx(0.8 * (1 - 0.8), rel=1e-6)
    assert logits.grad[3].item() == pytest.approx(0.8 * (0 - 0.8), rel=1e-6)


def test_gradcheck_float64():
    logits, q = _random_case(1, shape=(6, 3), pos_fraction=0.4)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: varifocal_loss(x, q.double(), reduction="none"), (logits,))


def test_half_inputs_computed_in_float32():
    logits, q = _random_case(2)
    for dtype in (torch.bfloat16, torch.float16):
        got = varifocal_loss(logits.to(dtype), q, reduction="sum")
        assert got.dtype == torch.float32
        want = vfl_numpy(logits.to(dtype).float().numpy(), q.numpy()).sum()
        np.testing.assert_allclose(got.item(), want, rtol=q.numel() * 2**-24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = varifocal_loss(logits, q, reduction="sum")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), vfl_numpy(logits.numpy(), q.numpy()).sum(), rtol=q.numel() * 2**-24)


def test_empty_and_bad_input():
    empty = torch.zeros((0, 4), requires_grad=True)
    assert varifocal_loss(empty, empty.detach()).item() == 0.0
    assert varifocal_loss(empty, empty.detach(), reduction="mean").item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        varifocal_loss(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        varifocal_loss(torch.zeros(3), torch.zeros(3), reduction="avg")
