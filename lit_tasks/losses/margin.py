"""Margin softmax heads: ArcFace, CosFace, SphereFace and the combined margin, in fp32.

Every head turns cosines ``cos(theta_ij)`` between L2-normalised embeddings and class centres into
logits: non-target logits are ``s * cos(theta)``, the target logit is ``s * psi(theta)`` with the
combined margin of insightface (REFERENCE §1.2)::

    psi(theta) = cos(m1 * theta + m2) - m3

ArcFace is (1, m, 0), CosFace (1, 0, m), SphereFace (m, 0, 0), the normalised softmax (1, 0, 0). All
three terms are applied together (insightface's arcface_torch drops m2 when m3 > 0; we do not).

Beyond ``m1 * theta + m2 > pi`` the cosine stops decreasing, so a larger angle would be rewarded.
With ``m1 == 1`` we use ArcFace's fallback (insightface's original implementation)
``cos(theta) - m2 * sin(m2)`` once ``cos(theta) <= cos(pi - m2)``; with ``m1 != 1`` SphereFace's own
monotonic extension ``(-1)^k cos(m1 theta + m2) - 2k``, ``k = floor((m1 theta + m2) / pi)`` (the
A-Softmax psi of the SphereFace paper).

Gradients (``gradient=``): ``"classic"`` (default) is the exact derivative of psi with respect to
``cos(theta)`` (the pre-2022 insightface / paper behaviour); ``"straight_through"`` back-propagates as
if the margin were a constant offset (current insightface arcface_torch, which runs the arccos under
``no_grad``). Both give the same forward value. The derivative ``m1 sin(m1 theta + m2) / sin(theta)``
is unbounded at theta = 0 and pi, so it is evaluated with theta kept ``FP32_THETA_MIN`` away from
0 and pi: the smallest angle an fp32 cosine other than exactly 1 can express. No NaN or Inf at
cos = -1, 0, 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MARGINS = ("arcface", "cosface", "sphereface", "combined", "softmax")
# (m1, m2, m3) presets: ArcFace m=0.5 and CosFace m=0.4 as arcface_torch's configs; the combined
# (1, 0.3, 0.2) of insightface's mxnet sample_config; SphereFace m1=1.35, the value the ArcFace paper
# compares with under feature normalisation (the original m=4 needs SphereFace's lambda annealing).
MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
    "sphereface": (1.35, 0.0, 0.0),
    "combined": (1.0, 0.3, 0.2),
    "softmax": (1.0, 0.0, 0.0),
}
GRADIENTS = ("classic", "straight_through")
# The largest fp32 below 1 is 1 - 2**-24, i.e. theta = sqrt(2 * 2**-24): angles under it are not
# representable as an fp32 cosine, so the gradient there is the one at this angle.
FP32_THETA_MIN = math.sqrt(2.0 * 2.0**-24)


def cosine_logits(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(B, D) x (C, D) -> (B, C)`` cosines in fp32, autocast off (bf16 cosines are off by ~4e-3)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(centres.float(), dim=1))


class CombinedMargin(nn.Module):
    """Target logit ``s * (cos(m1 * theta + m2) - m3)``, others ``s * cos(theta)`` (insightface's combination).

    Args:
        scale: the logit scale s (64 in insightface).
        m1: multiplicative angular margin (SphereFace).
        m2: additive angular margin (ArcFace).
        m3: additive cosine margin (CosFace).
        gradient: ``"classic"`` (exact derivative) or ``"straight_through"`` (see module docstring).
    """

    def __init__(
        self, *, scale: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, gradient: str = "classic"
    ) -> None:
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r}: expected one of {GRADIENTS}")
        if m1 <= 0 or m2 < 0 or m3 < 0 or scale <= 0:
            raise ValueError(f"margins need scale > 0, m1 > 0, m2 >= 0, m3 >= 0; got s={scale}, m=({m1}, {m2}, {m3})")
        self.scale, self.m1, self.m2, self.m3, self.gradient = float(scale), float(m1), float(m2), float(m3), gradient

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}, gradient={self.gradient!r}"

    def psi(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Margin function value psi(cos) and its derivative d psi / d cos (fp64 in, fp64 out)."""
        if self.m1 == 1.0 and self.m2 == 0.0:  # CosFace / plain normalised softmax: no angle needed
            return cos - self.m3, torch.ones_like(cos)
        theta = torch.arccos(cos)
        phase = self.m1 * theta + self.m2
        theta_safe = theta.clamp(FP32_THETA_MIN, math.pi - FP32_THETA_MIN)
        # d cos(m1 theta + m2) / d cos(theta) = m1 sin(m1 theta + m2) / sin(theta), chain rule via arccos.
        ratio = torch.sin(self.m1 * theta_safe + self.m2) / torch.sin(theta_safe)
        if self.m1 == 1.0:
            # ArcFace fallback: past theta = pi - m2 use the CosFace-like cos - m2 sin m2 (monotone).
            inside = cos > math.cos(math.pi - self.m2)
            value = torch.where(inside, torch.cos(phase), cos - self.m2 * math.sin(self.m2))
            slope = torch.where(inside, ratio, torch.ones_like(cos))
        else:
            k = torch.floor(phase / math.pi)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
            value = sign * torch.cos(phase) - 2.0 * k
            slope = sign * self.m1 * ratio
        return value - self.m3, slope

    def forward(self, cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled fp32 logits ``(B, C)`` from cosines ``(B, C)`` and labels ``(B,)`` int64.

        ``labels[i] == -1`` means row i's class is not among these columns (another Partial FC shard):
        that row gets no margin.
        """
        cosines = cosines.float()
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cols = labels[rows]
        target = cosines[rows, cols].double()  # fp64 on B values only: exact margins at no real cost
        # Rounding can put a cosine a few ulps outside [-1, 1]: clamp the value fed to arccos only
        # (torch's clamp would also zero the gradient at the bounds).
        value, slope = self.psi(target.detach().clamp(-1.0, 1.0))
        if self.gradient == "straight_through":
            slope = torch.ones_like(slope)
        # Forward value psi(cos) exactly; backward slope * d cos (first-order identity).
        target = value + (target - target.detach()) * slope
        logits = cosines * self.scale  # the only (B, C) copy made here: it dominates memory at 1M classes
        return logits.index_put_((rows, cols), (target * self.scale).float())


class ArcFace(CombinedMargin):
    """Additive angular margin: ``s * cos(theta + m)`` (Deng et al., CVPR 2019)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.5, gradient: str = "classic") -> None:
        super().__init__(scale=scale, m1=1.0, m2=margin, m3=0.0, gradient=gradient)


class CosFace(CombinedMargin):
    """Additive cosine margin: ``s * (cos(theta) - m)`` (Wang et al., CVPR 2018)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.4, gradient: str = "classic") -> None:
        super().__init__(scale=scale, m1=1.0, m2=0.0, m3=margin, gradient=gradient)


class SphereFace(CombinedMargin):
    """Multiplicative angular margin ``s * psi(m * theta)`` (Liu et al., CVPR 2017), on normalised features.

    This is SphereFace inside insightface's combined-margin framework (m1 = m, features normalised and
    scaled by s); the original also kept the feature norm and blended in the plain logit with an
    annealed lambda (REFERENCE §1.3), which is what made m = 4 trainable there.
    """

    def __init__(self, scale: float = 64.0, margin: float = 1.35, gradient: str = "classic") -> None:
        super().__init__(scale=scale, m1=margin, m2=0.0, m3=0.0, gradient=gradient)


def build_margin(
    name: str = "arcface",
    *,
    scale: float = 64.0,
    m1: float | None = None,
    m2: float | None = None,
    m3: float | None = None,
    gradient: str = "classic",
) -> CombinedMargin:
    """The head for ``name`` with its preset margins, any of ``m1/m2/m3`` given overriding the preset."""
    if name not in MARGIN_PRESETS:
        raise ValueError(f"margin={name!r}: expected one of {MARGINS}")
    p1, p2, p3 = MARGIN_PRESETS[name]
    return CombinedMargin(
        scale=scale, m1=p1 if m1 is None else m1, m2=p2 if m2 is None else m2, m3=p3 if m3 is None else m3,
        gradient=gradient,
    )


class MarginSoftmaxLoss(nn.Module):
    """Full softmax over all ``num_classes`` centres with a margin head: ``CE(margin(cos(E, W)), y)``.

    The centres are an ordinary Parameter trained by the task's optimizer. Shapes: embeddings
    ``(B, D)`` any float dtype, labels ``(B,)`` int64 in ``[0, num_classes)``; returns the fp32 mean loss.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: CombinedMargin) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.margin = margin
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_labels(labels, self.num_classes)
        logits = self.margin(cosine_logits(embeddings, self.weight), labels)
        with torch.autocast(logits.device.type, enabled=False):
            return F.cross_entropy(logits, labels)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise a clear error for non-int64 labels or labels outside ``[0, num_classes)``."""
    if labels.dtype != torch.int64:
        raise TypeError(f"identity labels must be int64, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"identity labels must lie in [0, {num_classes}); got min {int(labels.min())}, max {int(labels.max())}"
        )
