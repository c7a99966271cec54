"""Residual log-likelihood estimation loss (Li et al. 2021, "Human Pose Regression with Residual
Log-likelihood Estimation", §3.3 eq. 9-11), and the plain L1 coordinate loss it is compared with.

The network predicts, per keypoint and axis, a location ``mu_hat`` and a scale ``sigma_hat`` in (0, 1);
the density of the ground truth ``mu_gt`` is modelled as ``P(mu_gt) = 1 / sigma_hat * G_phi(mu_bar) *
Q(mu_bar)`` with ``mu_bar = (mu_hat - mu_gt) / sigma_hat``, where ``Q`` is a fixed simple density and
``G_phi`` a learned RealNVP correction (:mod:`lit_tasks.losses.rle_flow`, shared by all keypoints). The
loss is the negative log of it. Per keypoint ``k`` and axis ``d`` (d = x, y), with ``Delta = mu_hat - mu_gt``:

* official (Jeff-sjtu/res-loglikelihood-regression, ``rlepose/models/regression_nf.py`` + ``criterion.py``,
  our default ``q_distribution="official"``):
  ``log sigma_d - log G(Delta / sigma)  +  log(sqrt(2 pi) sigma_d) + |Delta_d| / (sqrt(2) sigma_d + 1e-9)``
  -- a Laplace-like ``Q`` whose constants are neither the Laplace nor the Gaussian ones (the author: "b =
  sqrt(2) sigma in our implementation", REFERENCE.md §8.2);
* mmpose ``RLELoss(q_dis="laplace")``, ``e = Delta / (sigma + 1e-9)``:
  ``log sigma_d - log G(e)  +  log(2 sigma_d) + |e_d|``;
* mmpose ``RLELoss(q_dis="gaussian")``: ``log sigma_d - log G(e)  +  log(sqrt(2 pi) sigma_d) + e_d^2 / 2``.

As in both references, ``log G`` is one value per keypoint (the flow density of the 2-D vector) broadcast
against the two ``log sigma_d``, so it enters the sum twice; ``residual=False`` drops the ``Q`` part.
Every term is multiplied by the keypoint's weight (visibility: v=1 and v=2 are labelled and trained, v=0 is
masked out), summed, and divided by the batch size B -- both references normalise by ``len(loss)`` = B,
not by the number of visible keypoints, so a sample contributes in proportion to its labelled keypoints.
B is the local batch: like the references, nothing is all-reduced (DDP's gradient averaging then gives the
global per-sample mean when every rank has the same batch size).

Negative values are expected: this is a negative log-*density* of coordinates normalised to the crop
(the crop is [-0.5, 0.5]), not a probability, and a confident correct prediction has a density well above 1
(the official author, jeffffffli/res-loglikelihood-regression#5). Do not clamp it at 0 (a request seen on
ultralytics#23577): that would stop training exactly when it starts to work.

Everything is computed in fp32 with autocast off (float64 inputs stay float64), so ``bf16-mixed`` and
``16-mixed`` runs stay finite.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from lit_tasks.losses.rle_flow import RealNVP

Q_DISTRIBUTIONS = ("official", "laplace", "gaussian")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT2 = math.sqrt(2.0)
_EPS = 1e-9  # as both references, in the residual's denominator


def _check_shapes(coords: Tensor, target: Tensor, weight: Tensor, name: str) -> Tensor:
    """Check ``(B, K, 2)`` coordinates and a ``(B, K)`` / ``(B, K, 1|2)`` weight; return it as ``(B, K, 1|2)``."""
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise ValueError(f"{name}: coordinates must be (B, K, 2), got {tuple(coords.shape)}")
    if target.shape != coords.shape:
        raise ValueError(f"{name}: target {tuple(target.shape)} does not match predictions {tuple(coords.shape)}")
    if weight.shape == coords.shape[:2]:
        weight = weight[..., None]
    if weight.shape not in (coords.shape, coords.shape[:2] + (1,)):
        raise ValueError(f"{name}: weight must be (B, K) or (B, K, 2), got {tuple(weight.shape)} for "
                         f"predictions {tuple(coords.shape)}")
    return weight


def rle_loss(
    coords: Tensor,
    sigma: Tensor,
    target: Tensor,
    weight: Tensor,
    log_density: Callable[[Tensor], Tensor],
    q_distribution: str = "official",
    residual: bool = True,
) -> Tensor:
    """RLE negative log-likelihood summed over keypoints and divided by the batch size (see module docstring).

    Args:
        coords: ``(B, K, 2)`` predicted locations ``mu_hat`` (normalised coordinates).
        sigma: ``(B, K, 2)`` predicted scales in (0, 1) (after the sigmoid).
        target: ``(B, K, 2)`` ground truth ``mu_gt`` in the same normalisation.
        weight: ``(B, K)`` or ``(B, K, 2)`` bool / float; 0 masks a keypoint (unlabelled, v = 0).
        log_density: ``(N, 2) -> (N,)`` log-density of the normalised residual (the RealNVP's ``log_prob``).
        q_distribution: ``"official"``, ``"laplace"`` or ``"gaussian"`` (mmpose's two variants).
        residual: add the ``Q`` term (RLE proper); False leaves the flow term alone.

    Returns:
        A scalar; can be negative.
    """
    if q_distribution not in Q_DISTRIBUTIONS:
        raise ValueError(f"rle_loss: q_distribution must be one of {Q_DISTRIBUTIONS}, got {q_distribution!r}")
    weight = _check_shapes(coords, target, weight, "rle_loss")
    if sigma.shape != coords.shape:
        raise ValueError(f"rle_loss: sigma {tuple(sigma.shape)} does not match coordinates {tuple(coords.shape)}")
    with torch.autocast(device_type=coords.device.type, enabled=False):
        dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
        # Only labelled keypoints enter the computation (the flow runs on them alone): a masked keypoint's
        # target or sigma cannot leak NaN / inf into the value or the gradients. The flow term takes the
        # x-axis weight, as the official ``nf_loss * weight[:, :, :1]``.
        valid = (weight > 0).any(dim=-1)
        w = weight[valid].to(dtype)  # (N, 1 | 2)
        mu, sigma, target = coords[valid].to(dtype), sigma[valid].to(dtype), target[valid].to(dtype)
        delta = mu - target
        # The official code feeds Delta / sigma to the flow; mmpose adds 1e-9 to sigma first.
        error = delta / sigma if q_distribution == "official" else delta / (sigma + _EPS)
        log_phi = log_density(error).to(dtype)[:, None]  # (N, 1): one density per keypoint ...
        log_sigma = torch.log(sigma)
        loss = (log_sigma - log_phi) * w[:, :1]  # ... broadcast over the two axes, as both references
        if residual:
            if q_distribution == "official":
                q = log_sigma + _LOG_SQRT_2PI + delta.abs() / (_SQRT2 * sigma + _EPS)
            elif q_distribution == "laplace":
                q = torch.log(2 * sigma) + error.abs()
            else:
                q = log_sigma + _LOG_SQRT_2PI + 0.5 * error * error
            loss = loss + q * w
        return loss.sum() / max(coords.shape[0], 1)


class RLELoss(nn.Module):
    """RLE loss with its RealNVP flow ``self.flow`` (trained with the network; never used at inference).

    Args:
        q_distribution: ``"official"`` (default), ``"laplace"`` or ``"gaussian"`` (mmpose); see the module docstring.
        residual: add the ``Q`` term (True in both references).
        flow_couplings, flow_hidden: RealNVP size (6 couplings, 64 hidden units in both references).
        flow_xavier_gain: ``None`` = official initialisation (PyTorch default), ``0.01`` = mmpose's.

    ``forward(coords, sigma, target, weight)`` takes the tensors of :func:`rle_loss` and returns a scalar.
    """

    def __init__(self, *, q_distribution: str = "official", residual: bool = True, flow_couplings: int = 6,
                 flow_hidden: int = 64, flow_xavier_gain: float | None = None) -> None:
        super().__init__()
        if q_distribution not in Q_DISTRIBUTIONS:
            raise ValueError(f"RLELoss: q_distribution must be one of {Q_DISTRIBUTIONS}, got {q_distribution!r}")
        self.q_distribution = q_distribution
        self.residual = residual
        self.flow = RealNVP(num_couplings=flow_couplings, hidden=flow_hidden, xavier_gain=flow_xavier_gain)

    def forward(self, coords: Tensor, sigma: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        return rle_loss(coords, sigma, target, weight, self.flow.log_prob, self.q_distribution, self.residual)


def coordinate_l1_loss(coords: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Plain L1 regression (the "direct regression" baseline of the RLE paper, Table 1): ``sum w |Delta| / B``.

    Same masking and normaliser as :func:`rle_loss`, so the two differ only in the likelihood. mmpose's
    ``L1Loss`` takes the mean over all ``B * K * 2`` entries instead (this value divided by ``2K``), a constant
    factor that Adam does not see. fp32 with autocast off, like the RLE loss.

    Args:
        coords, target: ``(B, K, 2)`` normalised coordinates.
        weight: ``(B, K)`` or ``(B, K, 2)`` bool / float; 0 masks a keypoint.
    """
    weight = _check_shapes(coords, target, weight, "coordinate_l1_loss")
    with torch.autocast(device_type=coords.device.type, enabled=False):
        dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
        valid = (weight > 0).any(dim=-1)
        delta = (coords[valid].to(dtype) - target[valid].to(dtype)).abs()
        return (delta * weight[valid].to(dtype)).sum() / max(coords.shape[0], 1)


class CoordinateL1Loss(nn.Module):
    """:func:`coordinate_l1_loss` as a module, with the same ``forward(coords, sigma, target, weight)`` as
    :class:`RLELoss` (``sigma`` is ignored) so a task can swap the two."""

    def forward(self, coords: Tensor, sigma: Tensor | None, target: Tensor, weight: Tensor) -> Tensor:
        return coordinate_l1_loss(coords, target, weight)
