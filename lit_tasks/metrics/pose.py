"""Keypoint metrics: PCK, its AUC and EPE (mmpose's rules), and COCO OKS AP (pycocotools' keypoint COCOeval).

PCK, AUC and EPE follow mmpose ``mmpose/evaluation/functional/keypoint_eval.py`` (REFERENCE.md §8.6):

* a keypoint counts only if its ground truth is labelled (``visible``) and its instance has a non-zero
  normalisation; the normalised distance is ``||(pred - gt) / norm||_2`` with ``norm = max(box w, box h)``
  (mmpose's ``PCKAccuracy(norm_item="bbox")``), and a keypoint is correct when it is ``< thr``;
* PCK is the **mean over keypoint types of the per-type accuracy** (``keypoint_pck_accuracy``'s
  ``avg_acc``), over the types with at least one valid instance -- not the fraction of all valid keypoints;
  0 when nothing is valid, as mmpose;
* AUC is the mean of that PCK over the ``num_thresholds`` thresholds ``0, 1/n, ..., (n-1)/n`` (0 .. 0.95 for
  n = 20, ``keypoint_auc``). mmpose's ``AUC`` metric normalises by a fixed pixel length (``norm_factor=30``)
  where we use the box size, the same normalisation as PCK, so the two figures are comparable;
* EPE is the mean pixel distance over valid keypoints (``keypoint_epe``; micro average).

Differing knowingly: mmpose replaces a *negative* normalisation by 1e6 (counting the keypoint as correct);
we ignore such instances as zero-size ones. Distances are float64 (mmpose stores them as float32).

The states are per-keypoint-type sums (PCK, AUC, EPE) or concatenated rows (OKS AP), so DDP sync is exact
and the result does not depend on how samples are split across processes or batches.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_tasks.ops.oks import COCO_KEYPOINT_SIGMAS, oks_nms_per_image
from lit_tasks.metrics.coco import format_coco_table

# pycocotools COCOeval._summarizeKps, in order (maxDets = 20 for keypoints, no "small" area range).
KEYPOINT_SUMMARY_ROWS = (
    ("Average Precision", "0.50:0.95", "all", 20, "map"),
    ("Average Precision", "0.50", "all", 20, "map_50"),
    ("Average Precision", "0.75", "all", 20, "map_75"),
    ("Average Precision", "0.50:0.95", "medium", 20, "map_medium"),
    ("Average Precision", "0.50:0.95", "large", 20, "map_large"),
    ("Average Recall", "0.50:0.95", "all", 20, "mar"),
    ("Average Recall", "0.50", "all", 20, "mar_50"),
    ("Average Recall", "0.75", "all", 20, "mar_75"),
    ("Average Recall", "0.50:0.95", "medium", 20, "mar_medium"),
    ("Average Recall", "0.50:0.95", "large", 20, "mar_large"),
)
KEYPOINT_AP_KEYS = tuple(row[-1] for row in KEYPOINT_SUMMARY_ROWS)


def format_keypoint_table(values: dict[str, Tensor], title: str = "COCO keypoint evaluation (OKS)") -> str:
    """The ten lines pycocotools prints for keypoints, from :class:`KeypointAP`'s result."""
    return format_coco_table(values, title=title, rows=KEYPOINT_SUMMARY_ROWS)


def _check_pose_inputs(preds: Tensor, target: Tensor, visible: Tensor, boxes_xyxy: Tensor | None) -> None:
    if preds.ndim != 3 or preds.shape[-1] < 2 or target.shape[:2] != preds.shape[:2] or target.shape[-1] < 2:
        raise ValueError(f"pose metric: preds {tuple(preds.shape)} and target {tuple(target.shape)} must be (N, K, 2)")
    if visible.shape != preds.shape[:2]:
        raise ValueError(f"pose metric: visible must be (N, K) = {tuple(preds.shape[:2])}, got {tuple(visible.shape)}")
    if boxes_xyxy is not None and boxes_xyxy.shape != (preds.shape[0], 4):
        raise ValueError(f"pose metric: boxes_xyxy must be (N, 4), got {tuple(boxes_xyxy.shape)}")


def normalized_distances(preds: Tensor, target: Tensor, visible: Tensor, boxes_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, K)`` distances ``||pred - gt|| / max(w, h)`` (float64) and the ``(N, K)`` mask of valid keypoints.

    Valid = labelled ground truth (``visible``) in an instance whose box has ``max(w, h) > 0``.
    """
    _check_pose_inputs(preds, target, visible, boxes_xyxy)
    boxes = boxes_xyxy.to(torch.float64)
    norm = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values  # (N,)
    valid = visible.bool() & (norm > 0)[:, None]
    diff = preds[..., :2].to(torch.float64) - target[..., :2].to(torch.float64)
    dist = torch.linalg.vector_norm(diff, dim=-1) / torch.where(norm > 0, norm, 1.0)[:, None]
    return dist, valid


def pck_per_keypoint(correct: Tensor, valid: Tensor) -> Tensor:
    """Per-type accuracy ``correct / valid`` (``(..., K)``), NaN where a type has no valid keypoint."""
    return torch.where(valid > 0, correct / valid.clamp_min(1), torch.full_like(correct, float("nan")))


def mean_pck(correct: Tensor, valid: Tensor) -> Tensor:
    """mmpose's ``avg_acc``: mean of the per-type accuracies over types with a valid keypoint; 0 if none."""
    acc = pck_per_keypoint(correct, valid)
    has = valid > 0
    return torch.where(has.any(), torch.nanmean(acc, dim=-1), torch.zeros((), dtype=acc.dtype, device=acc.device))


class _PCKCounts(Metric):
    """Per-threshold, per-keypoint-type counts of correct and valid keypoints (sum states)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_keypoints: int, thresholds: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_keypoints < 1:
            raise ValueError(f"{type(self).__name__}: num_keypoints must be >= 1, got {num_keypoints}")
        self.num_keypoints = num_keypoints
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float64), persistent=False)
        t = len(thresholds)
        self.add_state("correct", default=torch.zeros(t, num_keypoints, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("valid", default=torch.zeros(num_keypoints, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, visible: Tensor, boxes_xyxy: Tensor) -> None:
        """Add instances.

        Args:
            preds: ``(N, K, 2)`` predicted keypoints (extra columns, e.g. scores, are ignored).
            target: ``(N, K, 2|3)`` ground truth in the same coordinates.
            visible: ``(N, K)`` bool, True for labelled keypoints (COCO v > 0).
            boxes_xyxy: ``(N, 4)`` instance boxes in the same coordinates (normalisation ``max(w, h)``).
        """
        if preds.shape[1] != self.num_keypoints:
            raise ValueError(f"{type(self).__name__}: expected {self.num_keypoints} keypoints, got {preds.shape[1]}")
        dist, valid = normalized_distances(preds, target, visible, boxes_xyxy)
        hit = (dist[None] < self.thresholds.to(dist.device)[:, None, None]) & valid[None]  # (T, N, K)
        self.correct += hit.sum(dim=1).to(torch.float64)
        self.valid += valid.sum(dim=0).to(torch.float64)


class PCK(_PCKCounts):
    """PCK@``threshold`` with box normalisation (mmpose ``PCKAccuracy(norm_item="bbox")``, default 0.05).

    ``update(preds, target, visible, boxes_xyxy)`` (see :meth:`_PCKCounts.update`); ``compute()`` returns the
    scalar mean over keypoint types of the per-type accuracy (module docstring).
    """

    def __init__(self, num_keypoints: int, threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(num_keypoints, [threshold], **kwargs)

    def compute(self) -> Tensor:
        return mean_pck(self.correct[0], self.valid)


class PCKAUC(_PCKCounts):
    """Area under the PCK curve: mean of :class:`PCK` at ``0, 1/n, ..., (n-1)/n`` (mmpose ``keypoint_auc``)."""

    def __init__(self, num_keypoints: int, num_thresholds: int = 20, **kwargs: Any) -> None:
        if num_thresholds < 1:
            raise ValueError(f"PCKAUC: num_thresholds must be >= 1, got {num_thresholds}")
        super().__init__(num_keypoints, [i / num_thresholds for i in range(num_thresholds)], **kwargs)

    def compute(self) -> Tensor:
        return torch.stack([mean_pck(c, self.valid) for c in self.correct]).mean()


class EPE(Metric):
    """End-point error: mean Euclidean distance over labelled keypoints, in the inputs' units (mmpose ``keypoint_epe``).

    ``update(preds (N, K, 2), target (N, K, 2|3), visible (N, K))``; 0 when nothing was labelled (as mmpose).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, visible: Tensor) -> None:
        _check_pose_inputs(preds, target, visible, None)
        diff = preds[..., :2].to(torch.float64) - target[..., :2].to(torch.float64)
        dist = torch.linalg.vector_norm(diff, dim=-1)
        mask = visible.bool()
        self.total += dist[mask].sum()
        self.count += mask.sum()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)


class KeypointAP(Metric):
    """COCO keypoint AP / AR (OKS) through ``COCOeval(iouType="keypoints")``, from in-memory annotations.

    Ground truth and predictions arrive through :meth:`update` (original-image coordinates) and are kept as
    concatenated rows; :meth:`compute` builds the two COCO objects in memory (no file) and runs the reference
    evaluation: OKS with the dataset's ``sigmas`` and the GT ``area``, 10 OKS thresholds 0.50:0.95, maxDets
    20, areas all / medium / large; GT with no labelled keypoint or ``iscrowd`` is ignored as in pycocotools.
    Predictions go through ``loadRes``, which sets each one's area and box from the extent of its keypoints.

    Ground truth may be sent more than once (e.g. every crop of an image carrying all the image's
    annotations): rows are de-duplicated by annotation ``id``. The evaluated images are all image ids seen
    in either ground truth or predictions, so an image whose people got no prediction counts as missed.

    With ``oks_nms_threshold``, predictions sent with ``nms_areas > 0`` (poses predicted from detector boxes,
    several of which may cover one person) go through OKS NMS per image at :meth:`compute`, after the DDP
    gather, so crops of one image split across processes or batches are compared with each other
    (:func:`~lit_tasks.ops.oks.oks_nms_per_image`, the official ``oks_pose_nms``); the others are kept as sent.

    Args:
        sigmas: per-keypoint OKS sigmas (K of them); COCO's 17 by default.
        category_id: category written to the in-memory ground truth / results (single-category evaluation).
        backend: ``"faster_coco_eval"`` (same algorithm, C++, faster) or ``"pycocotools"``.
        oks_nms_threshold: OKS above which a lower-scored pose of the same image is dropped (0.9 in the
            references); None disables NMS.

    ``compute()`` returns a dict with :data:`KEYPOINT_AP_KEYS` (``map``, ``map_50``, ``map_75``,
    ``map_medium``, ``map_large``, ``mar``, ``mar_50``, ``mar_75``, ``mar_medium``, ``mar_large``) as float64
    scalars; ``-1`` where pycocotools has nothing to average (no ground truth in that area range).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, sigmas: Sequence[float] = COCO_KEYPOINT_SIGMAS, category_id: int = 1,
                 backend: str = "faster_coco_eval", oks_nms_threshold: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if backend not in ("faster_coco_eval", "pycocotools"):
            raise ValueError(f"KeypointAP: backend must be 'faster_coco_eval' or 'pycocotools', got {backend!r}")
        self.sigmas = [float(s) for s in sigmas]
        self.num_keypoints = len(self.sigmas)
        self.category_id = int(category_id)
        self.backend = backend
        self.oks_nms_threshold = oks_nms_threshold
        # Flat 1-D float64 rows (ids up to 2^53 are exact); 1-D so that torchmetrics' empty-rank placeholder
        # (a 1-D tensor of the metric dtype) gathers with them under DDP.
        self.add_state("gt_rows", default=[], dist_reduce_fx="cat")
        self.add_state("dt_rows", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    @property
    def _gt_width(self) -> int:
        return 8 + 3 * self.num_keypoints  # image_id, id, x0, y0, x1, y1, area, iscrowd, keypoints

    @property
    def _dt_width(self) -> int:
        return 3 + 3 * self.num_keypoints  # image_id, score, NMS area, keypoints (x, y, keypoint score)

    def update(self, preds: dict[str, Tensor] | None = None, targets: dict[str, Tensor] | None = None) -> None:
        """Add predictions and / or ground-truth annotations (either may be None).

        Args:
            preds: ``keypoints`` ``(P, K, 2|3)`` image pixels (third column, if any, = keypoint score, kept in
                the results but unused by OKS), ``scores`` ``(P,)`` instance scores, ``image_id`` ``(P,)``,
                optional ``nms_areas`` ``(P,)``: areas for OKS NMS, 0 for a pose that takes no part in it.
            targets: ``keypoints`` ``(M, K, 3)`` = x, y, COCO visibility (0 unlabelled, 1, 2 labelled),
                ``boxes`` ``(M, 4)`` xyxy image pixels, ``area`` ``(M,)`` (the json's, e.g. segment area),
                ``image_id`` ``(M,)``, ``id`` ``(M,)`` unique annotation ids, optional ``iscrowd`` ``(M,)``.
        """
        k = self.num_keypoints
        if preds is not None:
            kpts = preds["keypoints"]
            p = kpts.shape[0]
            if kpts.ndim != 3 or kpts.shape[1] != k or kpts.shape[2] not in (2, 3):
                raise ValueError(f"KeypointAP: preds['keypoints'] must be (P, {k}, 2|3), got {tuple(kpts.shape)}")
            if kpts.shape[2] == 2:
                kpts = torch.cat([kpts, kpts.new_ones(p, k, 1)], dim=2)
            areas = preds.get("nms_areas")
            areas = kpts.new_zeros(p) if areas is None else areas
            rows = torch.cat([preds["image_id"].reshape(p, 1).to(torch.float64),
                              preds["scores"].reshape(p, 1).to(torch.float64),
                              areas.reshape(p, 1).to(device=kpts.device, dtype=torch.float64),
                              kpts.reshape(p, 3 * k).to(torch.float64)], dim=1)
            self.dt_rows.append(rows.reshape(-1).to(self.device))
        if targets is not None:
            kpts = targets["keypoints"]
            m = kpts.shape[0]
            if kpts.ndim != 3 or kpts.shape[1:] != (k, 3):
                raise ValueError(f"KeypointAP: targets['keypoints'] must be (M, {k}, 3), got {tuple(kpts.shape)}")
            iscrowd = targets.get("iscrowd")
            iscrowd = torch.zeros(m) if iscrowd is None else iscrowd
            parts = [targets["image_id"], targets["id"], *targets["boxes"].reshape(m, 4).unbind(1), targets["area"],
                     iscrowd]
            rows = torch.cat([torch.stack([t.reshape(m).to(torch.float64).cpu() for t in parts], dim=1),
                              kpts.reshape(m, 3 * k).to(torch.float64).cpu()], dim=1)
            self.gt_rows.append(rows.reshape(-1).to(self.device))

    def _rows(self, state: list[Tensor] | Tensor, width: int) -> np.ndarray:
        if isinstance(state, list) and not state:
            return np.zeros((0, width))
        return dim_zero_cat(state).cpu().numpy().reshape(-1, width)

    def coco_dicts(self) -> tuple[dict, list[dict]]:
        """The in-memory ground-truth dataset and results list that :meth:`compute` evaluates."""
        k = self.num_keypoints
        gt = self._rows(self.gt_rows, self._gt_width)
        dt = self._rows(self.dt_rows, self._dt_width)
        _, first = np.unique(gt[:, 1], return_index=True)  # de-duplicate by annotation id, keep the first
        gt = gt[np.sort(first)]
        if self.oks_nms_threshold is not None and len(dt):
            dt = dt[self._nms_keep(dt)]
        image_ids = sorted({int(i) for i in gt[:, 0]} | {int(i) for i in dt[:, 0]})
        annotations = []
        for row in gt:
            x0, y0, x1, y1 = (float(v) for v in row[2:6])
            keypoints = row[8:].reshape(k, 3)
            annotations.append({
                "id": int(row[1]), "image_id": int(row[0]), "category_id": self.category_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(row[6]), "iscrowd": int(row[7]),
                "keypoints": [float(v) for v in keypoints.reshape(-1)],
                "num_keypoints": int((keypoints[:, 2] > 0).sum()),
            })
        dataset = {
            "images": [{"id": i} for i in image_ids],
            "categories": [{"id": self.category_id, "name": str(self.category_id),
                            "keypoints": [str(i) for i in range(k)], "skeleton": []}],
            "annotations": annotations,
        }
        results = [{"image_id": int(row[0]), "category_id": self.category_id, "score": float(row[1]),
                    "keypoints": [float(v) for v in row[3:]]} for row in dt]
        return dataset, results

    def _nms_keep(self, dt: np.ndarray) -> np.ndarray:
        """Mask of the result rows kept: OKS NMS per image among rows with an NMS area, the others all kept."""
        keep = np.ones(len(dt), dtype=bool)
        subject = dt[:, 2] > 0
        if subject.any():
            rows = torch.from_numpy(dt[subject])
            kept = oks_nms_per_image(rows[:, 0], rows[:, 3:].reshape(len(rows), self.num_keypoints, 3), rows[:, 1],
                                     rows[:, 2], self.oks_nms_threshold, self.sigmas)
            keep[np.flatnonzero(subject)] = kept.numpy()
        return keep

    def compute(self) -> dict[str, Tensor]:
        dataset, results = self.coco_dicts()
        stats = evaluate_keypoints(dataset, results, self.sigmas, self.backend)
        return {key: torch.tensor(float(v), dtype=torch.float64) for key, v in zip(KEYPOINT_AP_KEYS, stats)}


def evaluate_keypoints(dataset: dict, results: list[dict], sigmas: Sequence[float],
                       backend: str = "faster_coco_eval") -> np.ndarray:
    """The 10 pycocotools keypoint statistics (``COCOeval.stats``) of ``results`` against ``dataset`` (dicts).

    With no result at all, the results object is built empty by hand (``loadRes`` fails on an empty list):
    AP and AR are then 0 where there is ground truth and -1 where there is none.
    """
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(dataset["images"]), "categories": list(dataset["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        if backend == "pycocotools":
            evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
            evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        else:
            evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints", kpt_oks_sigmas=list(sigmas),
                                 print_function=lambda *a, **k: None)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:10], dtype=np.float64)
