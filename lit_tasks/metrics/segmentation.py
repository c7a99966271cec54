"""Semantic segmentation metrics from one confusion matrix: PA, MPA, mIoU, FWIoU (Long et al. 2015, §5).

The matrix ``n`` has rows = ground truth, columns = prediction and is summed over the whole dataset (not
averaged per image). With ``t_i = sum_j n_ij`` (ground-truth pixels of class i), ``p_j = sum_i n_ij``
(pixels predicted j) and ``N = sum_i t_i``:

* PA    = sum_i n_ii / N
* MPA   = nanmean_i n_ii / t_i                  (classes with t_i = 0 are skipped)
* IoU_i = n_ii / (t_i + p_i - n_ii);  mIoU = nanmean_i IoU_i   (classes with zero union are skipped)
* FWIoU = sum_{i: t_i > 0} (t_i / N) IoU_i

so a class absent from both prediction and ground truth does not drag the means down, while a class that
is only predicted has IoU 0 and counts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def confusion_matrix_update(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """The ``(C, C)`` int64 confusion matrix of one batch, rows = ground truth, from a single ``bincount``.

    Args:
        preds: ``(...)`` predicted class ids in ``[0, C)`` or ``(B, C, ...)`` scores (argmax is taken).
        target: ``(...)`` ground-truth class ids; ``ignore_index`` and any value outside ``[0, C)`` are dropped.
        num_classes: ``C``.
        ignore_index: label of unlabelled pixels; it must lie outside ``[0, C)`` since every out-of-range
            label is dropped.
    """
    if preds.ndim == target.ndim + 1:
        preds = preds.argmax(dim=1)
    if preds.shape != target.shape:
        raise ValueError(f"preds shape {tuple(preds.shape)} does not match target shape {tuple(target.shape)}")
    c = num_classes
    # Ignored pixels go to one extra bin (index C*C) that is dropped afterwards: a masked_fill is several
    # times cheaper than gathering the valid pixels with a boolean index (two nonzero+gather passes).
    invalid = (target < 0) | (target >= c)
    index = target.long() * c
    index.add_(preds)
    index.masked_fill_(invalid, c * c)
    counts = torch.bincount(index.reshape(-1), minlength=c * c + 1)
    return counts[: c * c].reshape(c, c)


def segmentation_scores(confmat: Tensor) -> dict[str, Tensor]:
    """PA, MPA, mIoU, FWIoU and per-class IoU / accuracy (float64) from a ``(C, C)`` confusion matrix.

    NaN conventions (REFERENCE §7.1): per-class accuracy is NaN where ``t_i = 0``, per-class IoU is NaN where
    the union is 0; the means skip NaNs; FWIoU sums over classes present in the ground truth. With no valid
    pixel at all every summary is NaN.
    """
    n = confmat.to(torch.float64)
    tp = torch.diagonal(n)
    gt = n.sum(dim=1)
    pred = n.sum(dim=0)
    total = gt.sum()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    present = gt > 0
    if total > 0:
        pa = tp.sum() / total
        fwiou = (gt[present] / total * iou[present]).sum()
    else:
        pa = fwiou = nan
    return {
        "PA": pa,
        "MPA": torch.nanmean(acc),
        "mIoU": torch.nanmean(iou),
        "FWIoU": fwiou,
        "IoU": iou,
        "Acc": acc,
        "confmat": confmat,
    }


class SegmentationMetrics(Metric):
    """Confusion-matrix metric for semantic segmentation, summed over processes under DDP.

    ``update(preds, target)`` takes ``preds`` as ``(B, H, W)`` class ids or ``(B, C, H, W)`` scores and
    ``target`` as ``(B, H, W)`` int64 with ``ignore_index`` for unlabelled pixels. ``compute()`` returns a
    dict with scalars ``PA``, ``MPA``, ``mIoU``, ``FWIoU`` (float64), per-class ``IoU`` and ``Acc`` ``(C,)``
    and the raw ``confmat`` ``(C, C)`` (rows = ground truth).

    Args:
        num_classes: number of classes ``C`` (including background when it is a class).
        ignore_index: ground-truth label that is not scored.
        validate_args: check that predictions lie in ``[0, C)`` and labels in ``[0, C)`` or ``ignore_index``
            (one extra pass over the batch; turn off for speed once the pipeline is trusted).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, validate_args: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            # A label cannot be both a class and "unlabelled"; remap the data (e.g. reduce_zero_label) instead.
            raise ValueError(f"ignore_index={ignore_index} must lie outside [0, num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch's pixels to the confusion matrix."""
        if self.validate_args:
            self._validate(preds, target)
        self.confmat += confusion_matrix_update(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        """PA, MPA, mIoU, FWIoU, per-class IoU/Acc and the confusion matrix."""
        return segmentation_scores(self.confmat)

    def _validate(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point():
            if preds.ndim != target.ndim + 1 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"score maps must be (B, {self.num_classes}, ...) for target {tuple(target.shape)}, "
                    f"got {tuple(preds.shape)}"
                )
            return
        if preds.numel() and (preds.min() < 0 or preds.max() >= self.num_classes):
            raise ValueError(
                f"predicted class ids must lie in [0, {self.num_classes}), got range "
                f"[{int(preds.min())}, {int(preds.max())}]"
            )
        bad = (target < 0) | (target >= self.num_classes)
        if self.ignore_index is not None:
            bad &= target != self.ignore_index
        if bool(bad.any()):
            values = torch.unique(target[bad])[:10].tolist()
            raise ValueError(
                f"target labels {values} are outside [0, {self.num_classes}) and not ignore_index={self.ignore_index}"
            )


def format_class_table(names: list[str], scores: dict[str, Tensor]) -> str:
    """Plain-text table of per-class IoU and accuracy (in %) and the four summaries."""
    width = max([len("class"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    for name, iou, acc in zip(names, scores["IoU"].tolist(), scores["Acc"].tolist()):
        lines.append(f"{name:<{width}}  {100 * iou:7.2f}  {100 * acc:7.2f}")
    lines.append("-" * (width + 18))
    lines.append("  ".join(f"{k} {100 * float(scores[k]):.2f}" for k in ("PA", "MPA", "mIoU", "FWIoU")))
    return "\n".join(lines)
