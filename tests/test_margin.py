"""Margin heads against the closed-form NumPy formula, their gradients, fallbacks and precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_tasks.losses.margin import (
    FP32_THETA_MIN,
    ArcFace,
    CombinedMargin,
    CosFace,
    MarginSoftmaxLoss,
    SphereFace,
    build_margin,
)

SETTINGS = {  # name -> (m1, m2, m3)
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
    "sphereface": (1.35, 0.0, 0.0),
    "combined": (1.0, 0.3, 0.2),
    "all_three": (1.2, 0.2, 0.1),
    "softmax": (1.0, 0.0, 0.0),
}


def reference_target(cos: np.ndarray, m1: float, m2: float, m3: float) -> np.ndarray:
    """cos(m1 arccos(c) + m2) - m3 with the monotone extensions, in float64 NumPy."""
    theta = np.arccos(cos)
    phase = m1 * theta + m2
    if m1 == 1.0:
        inside = cos > math.cos(math.pi - m2) if m2 > 0 else np.ones_like(cos, dtype=bool)
        value = np.where(inside, np.cos(phase), cos - m2 * math.sin(m2))
    else:
        k = np.floor(phase / math.pi)
        value = (-1.0) ** k * np.cos(phase) - 2.0 * k
    return value - m3


def margins(m: tuple[float, float, float]) -> dict[str, float]:
    """(m1, m2, m3) as CombinedMargin's keywords."""
    return dict(zip(("m1", "m2", "m3"), m))


def random_case(b: int = 64, c: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(b, c, generator=g) * 2 - 1
    return cos, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_logits_match_closed_form(name: str) -> None:
    m1, m2, m3 = SETTINGS[name]
    head = CombinedMargin(scale=64.0, m1=m1, m2=m2, m3=m3)
    cos, labels = random_case()
    logits = head(cos, labels)
    assert logits.dtype == torch.float32
    expected = 64.0 * cos.double().numpy()
    rows = np.arange(len(labels))
    c_t = cos.double().numpy()[rows, labels.numpy()]
    expected[rows, labels.numpy()] = 64.0 * reference_target(c_t, m1, m2, m3)
    np.testing.assert_allclose(logits.double().numpy(), expected, atol=1e-5, rtol=0)
    # The main branch is exactly the textbook formula wherever m1*theta + m2 <= pi.
    inside = m1 * np.arccos(c_t) + m2 <= math.pi
    np.testing.assert_allclose(
        logits.double().numpy()[rows, labels.numpy()][inside],
        64.0 * (np.cos(m1 * np.arccos(c_t[inside]) + m2) - m3),
        atol=1e-5, rtol=0,
    )


def test_combined_margin_applies_all_three_terms() -> None:
    """insightface's CombinedMarginLoss drops m2 when m3 > 0; here (1, 0.3, 0.2) is not CosFace 0.2."""
    cos = torch.tensor([[0.6, 0.1]])
    label = torch.tensor([0])
    combined = CombinedMargin(scale=1.0, m1=1.0, m2=0.3, m3=0.2)(cos, label)[0, 0].item()
    assert combined == pytest.approx(math.cos(math.acos(0.6) + 0.3) - 0.2, abs=1e-7)
    assert combined < CosFace(1.0, 0.2)(cos, label)[0, 0].item() - 0.05


def test_normalised_softmax_when_no_margin() -> None:
    cos, labels = random_case(seed=1)
    head = build_margin("softmax", scale=30.0)
    assert torch.equal(head(cos, labels), 30.0 * cos)
    assert (head.m1, head.m2, head.m3) == (1.0, 0.0, 0.0)


def test_presets_and_overrides() -> None:
    assert (build_margin("arcface").m2, build_margin("cosface").m3, build_margin("arcface").scale) == (0.5, 0.4, 64.0)
    assert build_margin("combined", m2=0.1).m2 == 0.1 and build_margin("combined").m3 == 0.2
    assert isinstance(ArcFace(), CombinedMargin) and SphereFace(margin=4).m1 == 4
    with pytest.raises(ValueError, match="margin='nope'"):
        build_margin("nope")
    with pytest.raises(ValueError, match="gradient"):
        CombinedMargin(gradient="magic")
    with pytest.raises(ValueError, match="m1 > 0"):
        CombinedMargin(m2=-0.1)


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (4.0, 0.0, 0.0), (1.0, 0.3, 0.2), (1.2, 0.4, 0.1)])
def test_target_logit_is_monotone_in_theta(m: tuple[float, float, float]) -> None:
    """Past m1*theta + m2 = pi the fallbacks keep the target logit non-increasing in theta."""
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    cos = torch.cos(theta).float()[:, None]
    out = CombinedMargin(scale=1.0, **margins(m))(cos, torch.zeros(len(cos), dtype=torch.int64))[:, 0].double()
    assert (out[1:] - out[:-1] <= 1e-6).all()


@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined", "all_three"])
def test_classic_gradient_is_the_analytic_derivative(name: str) -> None:
    m1, m2, m3 = SETTINGS[name]
    cos, labels = random_case(seed=2)
    cos = cos.clamp(-0.99, 0.99).requires_grad_(True)
    weights = torch.randn(cos.shape, generator=torch.Generator().manual_seed(3))
    (CombinedMargin(scale=64.0, m1=m1, m2=m2, m3=m3, gradient="classic")(cos, labels) * weights).sum().backward()
    c = cos.detach().double().numpy()
    theta = np.arccos(c)
    phase = m1 * theta + m2
    if m1 == 1.0:
        slope = np.where(c > math.cos(math.pi - m2), np.sin(phase) / np.sin(theta), 1.0)
    else:
        slope = (-1.0) ** np.floor(phase / math.pi) * m1 * np.sin(phase) / np.sin(theta)
    expected = 64.0 * weights.double().numpy()
    rows = np.arange(len(labels))
    expected[rows, labels.numpy()] *= slope[rows, labels.numpy()]
    np.testing.assert_allclose(cos.grad.double().numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface"])
def test_straight_through_gradient_is_softmax_minus_onehot(name: str) -> None:
    cos, labels = random_case(seed=4)
    cos.requires_grad_(True)
    logits = CombinedMargin(scale=64.0, **margins(SETTINGS[name]), gradient="straight_through")(cos, labels)
    F.cross_entropy(logits, labels).backward()
    expected = 64.0 * (torch.softmax(logits.detach(), 1) - F.one_hot(labels, cos.shape[1])) / len(labels)
    torch.testing.assert_close(cos.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gradient", ["classic", "straight_through"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_no_nan_at_extreme_cosines(name: str, gradient: str) -> None:
    values = torch.tensor([-1.0, 0.0, 1.0])
    cos = values.repeat(3, 1).clone()  # every row has -1, 0, 1; the label puts each value on the target
    cos.requires_grad_(True)
    labels = torch.tensor([0, 1, 2])
    logits = CombinedMargin(scale=64.0, **margins(SETTINGS[name]), gradient=gradient)(cos, labels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss) and torch.isfinite(cos.grad).all()


def test_gradient_bound_near_cos_one_equals_smallest_fp32_angle() -> None:
    """At cos = 1 the classic gradient is the one at the nearest fp32 cosine below 1 (no Inf)."""
    head = CombinedMargin(scale=1.0, m1=1.0, m2=0.5, m3=0.0)
    cos = torch.tensor([[1.0], [1.0 - 2.0**-24]], requires_grad=True)
    head(cos, torch.zeros(2, dtype=torch.int64)).sum().backward()
    expected = math.sin(FP32_THETA_MIN + 0.5) / math.sin(FP32_THETA_MIN)
    assert cos.grad[0, 0].item() == pytest.approx(expected, rel=1e-4)
    assert cos.grad[1, 0].item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["arcface", "cosface", "combined"])
def test_logits_and_loss_stay_fp32_under_autocast(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    loss_fn = MarginSoftmaxLoss(20, 16, build_margin(name))
    emb = torch.randn(8, 16)
    labels = torch.randint(0, 20, (8,))
    emb[0] = loss_fn.weight[labels[0]].detach() * 3  # cos exactly 1 with its own centre
    emb[1] = -loss_fn.weight[labels[1]].detach()  # cos exactly -1
    reference = loss_fn(emb, labels)
    emb_half = emb.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(emb_half, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb_half.grad.float()).all()
    assert torch.isfinite(loss_fn.weight.grad).all()
    # Only the input rounding to half precision differs from the fp32 run.
    assert loss.item() == pytest.approx(reference.item(), rel=0.02)


def test_full_softmax_loss_equals_cross_entropy_of_margin_logits() -> None:
    torch.manual_seed(1)
    loss_fn = MarginSoftmaxLoss(30, 8, ArcFace(32.0, 0.5))
    emb, labels = torch.randn(16, 8), torch.randint(0, 30, (16,))
    cos = F.normalize(emb) @ F.normalize(loss_fn.weight.detach()).T
    c_t = cos[torch.arange(16), labels].double().numpy()
    logits = 32.0 * cos.double()
    logits[torch.arange(16), labels] = torch.from_numpy(32.0 * reference_target(c_t, 1.0, 0.5, 0.0))
    expected = F.cross_entropy(logits, labels)
    assert loss_fn(emb, labels).item() == pytest.approx(expected.item(), abs=1e-5)


def test_bad_labels_are_reported() -> None:
    loss_fn = MarginSoftmaxLoss(5, 4, CosFace())
    with pytest.raises(ValueError, match=r"\[0, 5\).*max 7"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="int64"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1], dtype=torch.int32))
