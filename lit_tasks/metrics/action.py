"""Per-frame average precision (AP) and calibrated AP (cAP) for online action detection (REFERENCE §9.5).

The protocol of OadTR's ``frame_level_map_n_cap`` (itself the per-frame THUMOS'14 protocol of Shou et al.
2017, CDC, and the calibrated precision of De Geest et al. 2016, TVSeries), over all evaluated frames of
all sessions at once:

* for each class ``c``, frames are ranked by the class score, descending; with ``TP(k)`` / ``FP(k)`` the
  positive / negative frames among the first ``k``,
  ``AP_c = (1 / #pos) * sum over positive frames of TP(k) / k`` (non-interpolated AP), and
  ``cAP_c = (1 / #pos) * sum over positive frames of w TP(k) / (w TP(k) + FP(k))`` with ``w = #neg / #pos``
  (precision as if positives and negatives were balanced);
* mAP / mcAP = mean over the action classes: background and the "ambiguous" class are not evaluated.

Where we differ from the reference loop, knowingly:

* **Ties.** The loop walks ``np.argsort(-score)``, so frames with equal scores are visited in an order
  that depends on the frame order (and on NumPy's unstable sort). Here frames with equal scores form one
  group and every positive of a group gets the precision at the end of the group: the threshold-based
  definition of ``sklearn.metrics.average_precision_score``. Without ties both are the same number;
  with ties ours does not depend on how frames are ordered or split over processes and batches.
* **A class with no positive frame** gives NaN in the loop (0 / 0), which turns the reference mAP into
  NaN; sklearn returns 0 with a warning. Here its AP and cAP are NaN and it is left out of the means
  (``nanmean``); with no evaluable class at all the means are NaN.
* **A class with no negative frame** (``w = 0``): the loop computes 0 / 0 for cAP; here the calibrated
  precision is 1 where ``FP(k) = 0`` (its limit as ``w -> 0`` with no false positive).
* **Ambiguous and unlabelled frames** are dropped by the metric itself: a frame whose target has the
  ambiguous class set (OadTR drops such windows when it builds the dataset, §9.1), and a frame whose
  target row is all zero (e.g. an anticipation target past the end of a video). The reference
  evaluates whatever frames its data layer gives it.
* **Duplicates.** A padding ``DistributedSampler`` repeats a few samples on some ranks; when frames come
  with their ``(session, frame)`` keys each frame is counted once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def frame_ap_cap(scores: Tensor, positives: Tensor, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """Per-column AP and calibrated AP of frame scores (REFERENCE §9.5), ties grouped as sklearn does.

    Args:
        scores: ``(N, K)`` scores of N frames for K classes (any real dtype; NaN is not allowed).
        positives: ``(N, K)`` bool, frame n is a positive of class k.
        chunk: classes ranked at once (bounds the ``(N, chunk)`` float64 work tensors).

    Returns:
        ``(ap, cap)``, each ``(K,)`` float64 on the device of ``scores``; NaN for a class with no positive.
    """
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"frame_ap_cap: scores {tuple(scores.shape)} and positives {tuple(positives.shape)} "
                         "must both be (N, K)")
    n, k = scores.shape
    ap = torch.full((k,), float("nan"), dtype=torch.float64, device=scores.device)
    cap = ap.clone()
    if n == 0:
        return ap, cap
    rank = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)[:, None]
    index = torch.arange(n, device=scores.device)[:, None]
    for lo in range(0, k, chunk):
        s = scores[:, lo : lo + chunk].to(torch.float64)
        order = torch.argsort(s, dim=0, descending=True, stable=True)
        s = s.gather(0, order)
        pos = positives[:, lo : lo + chunk].gather(0, order).to(torch.float64)
        tp = pos.cumsum(0)
        fp = rank - tp
        # Frames with equal scores form one group; each takes the counts at its group's last frame.
        is_last = torch.ones_like(s, dtype=torch.bool)
        is_last[:-1] = s[:-1] != s[1:]
        last = torch.where(is_last, index, n).flip(0).cummin(0).values.flip(0)
        tp, fp = tp.gather(0, last), fp.gather(0, last)
        n_pos = pos.sum(0)
        w = (n - n_pos) / n_pos
        precision = tp / (tp + fp)
        wtp = w * tp
        calibrated = torch.where(fp == 0, torch.ones_like(wtp), wtp / (wtp + fp))
        ap[lo : lo + chunk] = (pos * precision).sum(0) / n_pos
        cap[lo : lo + chunk] = (pos * calibrated).sum(0) / n_pos
    return ap, cap


def _cat(state: list[Tensor] | Tensor, empty_shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """A cat state as one tensor: a list before DDP sync, already a tensor after it, or empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else torch.zeros(empty_shape, dtype=dtype, device=device)


class FrameLevelMAP(Metric):
    """Per-frame AP, calibrated AP, mAP and mcAP over all frames of all sessions (OadTR protocol, §9.5).

    ``update(probs, targets, session=None, frame=None)``:
        probs: ``(N, C)`` class probabilities of N frames (OadTR: softmax over the non-ambiguous columns;
            the ambiguous column, if any, is ignored). Only the ranking within a class matters.
        targets: ``(N, C)`` one-hot, multi-hot or soft frame labels; a frame is a positive of class c when
            ``targets[:, c] >= positive_threshold``. Frames with the ambiguous class set and all-zero rows
            are dropped.
        session, frame: optional ``(N,)`` int keys of each frame; when given (always, or never), a frame
            seen twice (a padding DistributedSampler) is counted once.

    ``compute()`` returns ``{"AP": (C,), "cAP": (C,), "mAP": (), "mcAP": ()}`` float64; the per-class
    vectors are indexed by class id and NaN for background, ambiguous and classes with no positive frame.

    Args:
        num_classes: C, every column including background and ambiguous.
        background_index: background column (not evaluated), or None.
        ambiguous_index: ambiguous column (frames dropped, not evaluated), or None.
        positive_threshold: target value from which a frame counts as a positive.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, background_index: int | None = 0, ambiguous_index: int | None = None,
                 positive_threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, index in (("background_index", background_index), ("ambiguous_index", ambiguous_index)):
            if index is not None and not 0 <= index < num_classes:
                raise ValueError(f"FrameLevelMAP: {name}={index} outside [0, num_classes={num_classes})")
        if not 0 < positive_threshold <= 1:
            raise ValueError(f"FrameLevelMAP: positive_threshold must be in (0, 1], got {positive_threshold}")
        self.num_classes = num_classes
        self.background_index = background_index
        self.ambiguous_index = ambiguous_index
        self.positive_threshold = positive_threshold
        self.class_indices = [c for c in range(num_classes) if c not in (background_index, ambiguous_index)]
        if not self.class_indices:
            raise ValueError("FrameLevelMAP: no class left to evaluate once background and ambiguous are removed")
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("positives", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, targets: Tensor, session: Tensor | None = None, frame: Tensor | None = None) -> None:
        """Keep the evaluated columns of the batch's non-ambiguous, labelled frames."""
        c = self.num_classes
        if probs.ndim != 2 or probs.shape[1] != c or targets.shape != probs.shape:
            raise ValueError(f"FrameLevelMAP: probs {tuple(probs.shape)} and targets {tuple(targets.shape)} "
                             f"must both be (N, {c})")
        if (session is None) != (frame is None):
            raise ValueError("FrameLevelMAP: give both session and frame keys, or neither")
        has_keys = session is not None
        if len(self.keys) != (len(self.probs) if has_keys else 0):
            raise ValueError("FrameLevelMAP: session/frame keys must be given on every update or on none")
        if has_keys and (session.shape != (probs.shape[0],) or frame.shape != (probs.shape[0],)):
            raise ValueError(f"FrameLevelMAP: session {tuple(session.shape)} and frame {tuple(frame.shape)} "
                             f"must be ({probs.shape[0]},)")
        if not torch.isfinite(probs).all():
            raise ValueError("FrameLevelMAP: probs contain NaN or inf")
        keep = targets.sum(1) > 0
        if self.ambiguous_index is not None:
            keep &= targets[:, self.ambiguous_index] < self.positive_threshold
        cols = torch.as_tensor(self.class_indices, device=probs.device)
        # float64 scores stay float64 (their ties are the user's); anything else is ranked in float32.
        self.probs.append(probs[keep][:, cols].to(torch.float64 if probs.dtype == torch.float64 else torch.float32))
        self.positives.append((targets[keep][:, cols] >= self.positive_threshold).to(torch.uint8))
        if has_keys:
            self.keys.append(torch.stack([session[keep], frame[keep]], 1).long())

    def compute(self) -> dict[str, Tensor]:
        """AP / cAP per class and their means over the evaluated classes (see the class docstring)."""
        probs = _cat(self.probs, (0, len(self.class_indices)), torch.float32, self.device)
        positives = _cat(self.positives, tuple(probs.shape), torch.uint8, self.device)
        keys = _cat(self.keys, (0, 2), torch.long, self.device)
        if len(keys):
            _, inverse = torch.unique(keys, dim=0, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long, device=keys.device)
            first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=keys.device), reduce="amin")
            probs, positives = probs[first], positives[first]
        ap_k, cap_k = frame_ap_cap(probs, positives.bool())
        ap = torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=ap_k.device)
        cap = ap.clone()
        ap[self.class_indices] = ap_k
        cap[self.class_indices] = cap_k
        return {"AP": ap, "cAP": cap, "mAP": torch.nanmean(ap_k), "mcAP": torch.nanmean(cap_k)}


def format_ap_table(names: list[str], result: dict[str, Tensor], skip: tuple[int | None, ...] = (),
                    title: str | None = None) -> str:
    """Plain-text table of per-class AP and cAP (in %) and mAP / mcAP, for ``lit-tasks test``.

    Args:
        names: class names, one per column of ``result["AP"]``.
        result: :meth:`FrameLevelMAP.compute`'s dict.
        skip: columns not listed (background, ambiguous); a listed class with no positive frame shows ``-``.
        title: a first line (e.g. which frames were evaluated).
    """
    shown = [c for c in range(len(names)) if c not in skip]
    width = max([len("class"), *(len(names[c]) for c in shown)])
    cell = lambda v: f"{100 * v:7.2f}" if v == v else f"{'-':>7}"  # noqa: E731  (v != v: NaN)
    lines = [title] if title else []
    lines += [f"{'class':<{width}}  {'AP':>7}  {'cAP':>7}", "-" * (width + 18)]
    ap, cap = result["AP"].tolist(), result["cAP"].tolist()
    lines += [f"{names[c]:<{width}}  {cell(ap[c])}  {cell(cap[c])}" for c in shown]
    lines.append("-" * (width + 18))
    lines.append(f"mAP {100 * float(result['mAP']):.2f}  mcAP {100 * float(result['mcAP']):.2f}")
    return "\n".join(lines)
