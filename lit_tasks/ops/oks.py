"""Object keypoint similarity (OKS) between pose instances, and OKS-based NMS (COCO keypoint protocol).

OKS (cocodataset.org/#keypoints-eval, pycocotools ``computeOks``; REFERENCE.md §6) of two instances with
keypoints ``p``, ``q`` and area ``s``:  ``mean_k exp(-d_k^2 / (2 s k_k^2))`` with ``k_k = 2 sigma_k`` and
``d_k`` the distance between keypoint ``k`` of the two. :func:`oks_nms` is mmpose's ``oks_nms``
(``mmpose/evaluation/functional/nms.py``, from HRNet): greedy suppression in score order where the area of a
pair is the mean of the two instances' areas and, with ``vis_threshold``, only keypoints whose scores exceed
it in *both* instances count. Top-down pipelines run it per image on the poses predicted from detector boxes
(mmpose's COCO metric: threshold 0.9), since several boxes on one person give near-identical poses.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# pycocotools Params.setKpParams: per-keypoint standard deviations of the 17 COCO person keypoints.
COCO_KEYPOINT_SIGMAS: tuple[float, ...] = tuple(
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)


def pairwise_oks(keypoints_a: Tensor, keypoints_b: Tensor, areas_a: Tensor, areas_b: Tensor,
                 sigmas: Sequence[float] | Tensor | None = None, vis_threshold: float | None = None) -> Tensor:
    """OKS of every pair, as mmpose ``oks_iou``: ``(N, M)`` from ``(N, K, 2|3)`` and ``(M, K, 2|3)`` keypoints.

    Args:
        keypoints_a, keypoints_b: ``(x, y[, score])`` per keypoint; scores are only read with ``vis_threshold``.
        areas_a, areas_b: ``(N,)``, ``(M,)`` instance areas (e.g. box areas); a pair uses their mean.
        sigmas: ``(K,)`` per-keypoint sigmas; COCO's 17 by default.
        vis_threshold: if given, average only over keypoints whose score is above it in both instances
            (a pair with none gets OKS 0).

    Computed in float64.
    """
    a = keypoints_a.to(torch.float64)
    b = keypoints_b.to(torch.float64)
    k = a.shape[1]
    sig = torch.as_tensor(COCO_KEYPOINT_SIGMAS if sigmas is None else sigmas, dtype=torch.float64, device=a.device)
    if sig.shape != (k,) or b.shape[1] != k:
        raise ValueError(f"pairwise_oks: keypoints {tuple(a.shape)} / {tuple(b.shape)} and sigmas {tuple(sig.shape)} "
                         f"disagree on the number of keypoints")
    variances = (2 * sig) ** 2
    d2 = ((a[:, None, :, :2] - b[None, :, :, :2]) ** 2).sum(-1)  # (N, M, K)
    area = (areas_a.to(torch.float64)[:, None] + areas_b.to(torch.float64)[None, :]) / 2
    e = d2 / variances / (area[..., None] + np.spacing(1)) / 2
    sim = torch.exp(-e)
    if vis_threshold is None:
        return sim.mean(-1)
    if a.shape[-1] < 3 or b.shape[-1] < 3:
        raise ValueError("pairwise_oks: vis_threshold needs (x, y, score) keypoints")
    both = (a[:, None, :, 2] > vis_threshold) & (b[None, :, :, 2] > vis_threshold)
    count = both.sum(-1)
    return torch.where(count > 0, (sim * both).sum(-1) / count.clamp_min(1), sim.new_zeros(()))


def oks_nms(keypoints: Tensor, scores: Tensor, areas: Tensor, threshold: float = 0.9,
            sigmas: Sequence[float] | Tensor | None = None, vis_threshold: float | None = None) -> Tensor:
    """Greedy OKS-NMS of the poses of one image: indices kept, highest score first (int64).

    A pose is dropped when its OKS with an already kept, higher-scored pose is above ``threshold`` (mmpose
    keeps ``oks <= thr``). Equal scores keep the lower index first (mmpose's unstable ``argsort()[::-1]``
    leaves that order unspecified).

    Args:
        keypoints: ``(N, K, 2|3)`` in image pixels (third column = keypoint score, for ``vis_threshold``).
        scores: ``(N,)`` instance scores.
        areas: ``(N,)`` instance areas (mmpose uses the box area ``w * h``).
        threshold, sigmas, vis_threshold: see :func:`pairwise_oks`.
    """
    n = keypoints.shape[0]
    if scores.shape != (n,) or areas.shape != (n,):
        raise ValueError(f"oks_nms: {n} poses but scores {tuple(scores.shape)} and areas {tuple(areas.shape)}")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=keypoints.device)
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    oks = pairwise_oks(keypoints, keypoints, areas, areas, sigmas, vis_threshold)
    suppressed = torch.zeros(n, dtype=torch.bool)
    oks_cpu, order_cpu = oks.cpu(), order.cpu()
    keep = []
    for i in order_cpu.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= oks_cpu[i] > threshold
    return torch.tensor(keep, dtype=torch.int64, device=keypoints.device)
