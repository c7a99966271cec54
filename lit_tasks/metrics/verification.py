"""Pair verification: the LFW 10-fold protocol, TAR at fixed FAR and ROC AUC (REFERENCE §1.6).

The protocol as insightface's ``eval/verification.py``: squared Euclidean distance between
L2-normalised embeddings (``2 - 2 cos``, in [0, 4]); contiguous folds (sklearn ``KFold(10,
shuffle=False)``); on each fold the threshold from ``np.arange(0, 4, 0.01)`` with the best accuracy on
the other nine folds (``dist < threshold`` means "same", ties go to the smallest threshold) is scored
on the held-out fold; mean and population std over folds. TAR@FAR ("VAL@FAR"): thresholds
``np.arange(0, 4, 0.001)``, per fold the threshold reaching the target FAR on the training folds by
``interp1d(far, thresholds, kind="slinear")`` as scipy <= 1.8.1 evaluated it (:func:`slinear_interp`;
0 when the target FAR is never reached), TAR of the held-out fold at it, mean over folds. Pair order matters (folds are contiguous), so every pair
carries its index; under DDP the gathered pairs are put back in index order and duplicates (from a
padding DistributedSampler) dropped, so the result equals the single-process one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import BSpline
from scipy.stats import rankdata
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_roc
from torchmetrics.utilities import dim_zero_cat

FAR_TARGETS = {"1e-4": 1e-4, "1e-3": 1e-3, "1e-2": 1e-2}


def kfold_slices(n: int, n_folds: int) -> list[slice]:
    """Contiguous folds as sklearn ``KFold(n_folds, shuffle=False)``: the first ``n % n_folds`` are one longer."""
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def fold_counts(dist: np.ndarray, same: np.ndarray, folds: list[slice], thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Per fold and threshold, how many same / different pairs have ``dist < threshold``: ``(F, T)`` int.

    Counting by binary search in the sorted distances, O((N + T) log N) instead of O(N T).
    """
    below = lambda d: np.searchsorted(np.sort(d), thresholds, side="left")  # noqa: E731  (# of d < t)
    return {
        "same_below": np.stack([below(dist[f][same[f]]) for f in folds]),
        "diff_below": np.stack([below(dist[f][~same[f]]) for f in folds]),
        "n_same": np.array([int(same[f].sum()) for f in folds]),
        "n_diff": np.array([int((~same[f]).sum()) for f in folds]),
    }


def best_threshold_accuracy(
    dist: np.ndarray, same: np.ndarray, n_folds: int = 10, thresholds: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-fold test accuracy and the threshold chosen on the other folds (LFW protocol).

    Args:
        dist: ``(N,)`` float distances of the pairs, in dataset order.
        same: ``(N,)`` bool, True for same-identity pairs.
        n_folds: number of contiguous folds.
        thresholds: candidate thresholds, default ``np.arange(0, 4, 0.01)``.

    Returns:
        ``fold_accuracy`` ``(n_folds,)``, ``threshold`` ``(n_folds,)``, ``tpr``/``fpr`` ``(T,)`` mean
        over folds of the held-out ROC at every threshold (as insightface's ``calculate_roc``).
    """
    thresholds = np.arange(0, 4, 0.01) if thresholds is None else thresholds
    folds = kfold_slices(len(dist), n_folds)
    c = fold_counts(dist, same, folds, thresholds)
    # correct = true accepts + true rejects, (F, T) integer counts
    correct = c["same_below"] + (c["n_diff"][:, None] - c["diff_below"])
    total = correct.sum(0)
    accuracy, chosen = [], []
    for k, f in enumerate(folds):
        # Same denominator for every threshold, so argmax of counts == argmax of accuracies (first wins).
        best = int(np.argmax(total - correct[k]))
        accuracy.append(float(correct[k, best]) / float(f.stop - f.start))
        chosen.append(thresholds[best])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(c["n_same"][:, None] > 0, c["same_below"] / c["n_same"][:, None], 0.0)
        fpr = np.where(c["n_diff"][:, None] > 0, c["diff_below"] / c["n_diff"][:, None], 0.0)
    return {
        "fold_accuracy": np.asarray(accuracy),
        "threshold": np.asarray(chosen),
        "tpr": tpr.mean(0),
        "fpr": fpr.mean(0),
    }


def tar_at_far(
    dist: np.ndarray, same: np.ndarray, far_target: float, n_folds: int = 10, thresholds: np.ndarray | None = None
) -> tuple[float, float, float]:
    """``(TAR mean, TAR std, FAR mean)`` over folds at ``far_target`` (insightface ``calculate_val``)."""
    thresholds = np.arange(0, 4, 0.001) if thresholds is None else thresholds
    folds = kfold_slices(len(dist), n_folds)
    c = fold_counts(dist, same, folds, thresholds)
    tars, fars = [], []
    for k, f in enumerate(folds):
        n_diff_train = float(c["n_diff"].sum() - c["n_diff"][k])
        false_accepts = (c["diff_below"].sum(0) - c["diff_below"][k]).astype(np.float64)
        far_train = false_accepts / n_diff_train if n_diff_train else np.zeros(len(thresholds))
        if np.max(far_train) >= far_target:
            threshold = slinear_interp(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        tar, far = _tar_far(threshold, dist[f], same[f])
        tars.append(tar)
        fars.append(far)
    return float(np.mean(tars)), float(np.std(tars)), float(np.mean(fars))


def slinear_interp(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """``interp1d(x, y, kind="slinear")(x_new)`` as scipy <= 1.8.1 computed it, for sorted ``x`` with repeats.

    FAR is flat over many thresholds, so ``x`` repeats; scipy >= 1.9 refuses that ("Expect x to not have
    duplicates", insightface issues #2152 / #2290, whose advice is to pin scipy 1.8.1). Old scipy built
    the degree-1 B-spline with knots ``[x0, x, x_last]`` and coefficients ``y``; so do we, through
    scipy's own ``BSpline``, which gives the same numbers without the version pin.
    """
    return float(BSpline.construct_fast(np.r_[x[0], x, x[-1]], np.asarray(y, dtype=np.float64), 1)(x_new))


def _tar_far(threshold: float, dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """True-accept rate over same pairs and false-accept rate over different pairs at ``dist < threshold``."""
    accept = dist < threshold
    n_same, n_diff = same.sum(), (~same).sum()
    tar = float((accept & same).sum()) / float(n_same) if n_same else 0.0
    far = float((accept & ~same).sum()) / float(n_diff) if n_diff else 0.0
    return tar, far


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Exact ROC AUC in float64 via the Mann-Whitney U statistic (ties count one half); NaN for one class."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def verification_report(dist: np.ndarray, same: np.ndarray, n_folds: int = 10) -> dict[str, torch.Tensor]:
    """Everything the metric reports, from distances and labels in dataset order (see module docstring)."""
    if len(dist) < n_folds:
        warnings.warn(f"only {len(dist)} verification pairs: using {len(dist)} folds instead of {n_folds}")
        n_folds = len(dist)
    if n_folds < 2:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {"verification_accuracy": nan, "verification_accuracy_std": nan, "auc": nan}
    roc = best_threshold_accuracy(dist, same, n_folds)
    out = {
        "verification_accuracy": torch.tensor(roc["fold_accuracy"].mean()),
        "verification_accuracy_std": torch.tensor(roc["fold_accuracy"].std()),
        "threshold": torch.tensor(roc["threshold"].mean()),
        "fold_accuracy": torch.from_numpy(roc["fold_accuracy"]),
        "fold_threshold": torch.from_numpy(roc["threshold"]),
    }
    out["auc"] = torch.tensor(roc_auc(-dist, same), dtype=torch.float64)
    # Monotone map of the distance to [0, 1] (torchmetrics would otherwise sigmoid the scores).
    fpr, tpr, _ = binary_roc(torch.from_numpy(1.0 - dist / 4.0), torch.from_numpy(same.astype(np.int64)))
    out["roc_fpr"], out["roc_tpr"] = fpr, tpr
    for name, far in FAR_TARGETS.items():
        out[f"tar_at_far_{name}"] = torch.tensor(tar_at_far(dist, same, far, n_folds)[0], dtype=torch.float64)
    return out


class VerificationMetric(Metric):
    """Pair verification metric (LFW 10-fold protocol, TAR@FAR, ROC AUC), correct under DDP.

    ``update(embeddings_a (B, D), embeddings_b (B, D), same (B,) bool, index (B,) int64)``; ``index`` is
    the pair's position in the dataset (fold membership depends on it). ``compute()`` returns a dict of
    tensors: ``verification_accuracy`` (mean over folds), ``verification_accuracy_std``, ``threshold``
    (mean chosen threshold), ``fold_accuracy``/``fold_threshold`` ``(n_folds,)``, ``auc``,
    ``tar_at_far_1e-4|1e-3|1e-2`` and the pooled ROC curve ``roc_fpr``/``roc_tpr``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_folds: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_folds = n_folds
        self.add_state("dist", default=[], dist_reduce_fx="cat")
        self.add_state("same", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(
        self, embeddings_a: torch.Tensor, embeddings_b: torch.Tensor, same: torch.Tensor, index: torch.Tensor
    ) -> None:
        a = F.normalize(embeddings_a.detach().double(), dim=1)
        b = F.normalize(embeddings_b.detach().double(), dim=1)
        self.dist.append(((a - b) ** 2).sum(dim=1))
        self.same.append(same.detach().bool())
        self.index.append(index.detach().long())

    STATE_DTYPES = {"dist": torch.float64, "same": torch.bool, "index": torch.int64}

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        """As torchmetrics, but a process that saw no pair of this set (evaluation loaders give each pair to one
        process only, so a small set may leave one without any) joins the gather with empty states of the right
        dtype; torchmetrics would send float32 placeholders that do not match the other processes' bool / int64."""
        for name, dtype in self.STATE_DTYPES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                getattr(self, name).append(torch.empty(0, dtype=dtype, device=self.device))
        if dist_sync_fn is None:
            super()._sync_dist(process_group=process_group)
        else:
            super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.dist, list) and not self.dist:  # nothing seen anywhere: NaN results (and a warning)
            return verification_report(np.zeros(0), np.zeros(0, dtype=bool), self.n_folds)
        dist = dim_zero_cat(self.dist).cpu().numpy()
        same = dim_zero_cat(self.same).cpu().numpy()
        index = dim_zero_cat(self.index).cpu().numpy()
        index, first = np.unique(index, return_index=True)  # sorted by pair index, duplicates dropped
        return verification_report(dist[first], same[first], self.n_folds)
