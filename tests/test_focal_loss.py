"""Sigmoid focal loss against torchvision.ops.sigmoid_focal_loss and the paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvo

from lit_tasks.losses.focal import sigmoid_focal_loss


def logits_and_targets(seed: int = 0, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 7, generator=g) * 4
    targets = torch.rand(64, 7, generator=g) if soft else (torch.rand(64, 7, generator=g) < 0.2).float()
    return logits, targets


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.5), (-1, 2.0), (0.25, 0.0)])
def test_equals_torchvision(reduction, alpha, gamma):
    logits, targets = logits_and_targets()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, reduction),
                               tvo.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction), rtol=1e-6, atol=1e-6)


def test_soft_targets_follow_the_formula_in_float64():
    logits, targets = logits_and_targets(seed=1, soft=True)
    x, t = logits.double(), targets.double()
    p = 1 / (1 + torch.exp(-x))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    expected = -alpha_t * (1 - p_t) ** 2 * (t * torch.log(p) + (1 - t) * torch.log(1 - p))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), tvo.sigmoid_focal_loss(logits, targets))


def test_hand_computed_and_special_cases():
    # logit 0, positive: p_t = 1/2, so FL = 0.25 * (1/2)^2 * ln 2; negative: 0.75 * (1/2)^2 * ln 2.
    loss = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([0.0625, 0.1875]) * math.log(2))
    # gamma 0 without alpha is plain BCE.
    logits, targets = logits_and_targets(seed=2)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0),
                               F.binary_cross_entropy_with_logits(logits, targets, reduction="none"))
    # Saturated logits: finite values and gradients; integer targets accepted.
    big = torch.tensor([-100.0, 100.0, -100.0, 100.0], requires_grad=True)
    out = sigmoid_focal_loss(big, torch.tensor([0, 1, 1, 0]))
    out.sum().backward()
    assert out.isfinite().all() and big.grad.isfinite().all()
    assert out[:2].abs().max() < 1e-30 and out[2:].min() > 20
    empty = sigmoid_focal_loss(torch.zeros(0, 3), torch.zeros(0, 3), reduction="mean")
    assert empty.item() == 0


def test_bfloat16_and_autocast_give_float32():
    logits, targets = logits_and_targets(seed=3)
    out = sigmoid_focal_loss(logits.bfloat16(), targets.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sigmoid_focal_loss(logits.bfloat16().float(), targets), rtol=0, atol=0)
    torch.testing.assert_close(out, sigmoid_focal_loss(logits, targets), rtol=0.05, atol=1e-3)
    assert sigmoid_focal_loss(logits.double(), targets).dtype == torch.float64


def test_bad_input():
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and targets \(2,\) differ"):
        sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
