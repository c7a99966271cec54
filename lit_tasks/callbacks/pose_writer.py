"""Write `lit-tasks predict` poses as a COCO keypoint results json (what pycocotools' ``loadRes`` and the COCO
evaluation server take): ``[{"image_id", "category_id", "keypoints": [x1, y1, s1, ...], "score"}, ...]`` with
keypoints in original-image pixels and ``s_k`` the keypoint score."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lit_tasks.ops.oks import COCO_KEYPOINT_SIGMAS, oks_nms_per_image


def coco_keypoint_results(batches: Sequence[dict[str, torch.Tensor]], oks_nms_threshold: float | None = None,
                          sigmas: Sequence[float] | None = None) -> list[dict]:
    """``PoseTask.predict_step`` outputs -> COCO keypoint result records, after OKS NMS of detector-box poses.

    Each batch holds ``keypoints`` ``(B, K, 3)``, ``scores``, ``image_id``, ``category_id`` and ``nms_areas``
    ``(B,)`` (> 0 for poses from detector boxes: they go through OKS NMS per image, the others are all kept).
    """
    if not batches:
        return []
    cat = {key: torch.cat([b[key] for b in batches]) for key in ("keypoints", "scores", "image_id", "category_id",
                                                                  "nms_areas")}
    keep = torch.ones(len(cat["scores"]), dtype=torch.bool)
    subject = cat["nms_areas"] > 0
    if oks_nms_threshold is not None and subject.any():
        kept = oks_nms_per_image(cat["image_id"][subject], cat["keypoints"][subject], cat["scores"][subject],
                                 cat["nms_areas"][subject], oks_nms_threshold, sigmas or COCO_KEYPOINT_SIGMAS)
        keep[subject] = kept
    records = []
    for i in torch.nonzero(keep).flatten().tolist():
        records.append({"image_id": int(cat["image_id"][i]), "category_id": int(cat["category_id"][i]),
                        "keypoints": [round(float(v), 3) for v in cat["keypoints"][i].reshape(-1)],
                        "score": float(cat["scores"][i])})
    return records


class COCOKeypointResultsWriter(BasePredictionWriter):
    """At the end of `predict`, write every pose to ``output_file`` (default ``<log_dir>/keypoints.json``).

    Never overwrites: an existing file is an error, raised before anything is predicted. Under DDP the poses
    of every process are gathered (an image's crops may be spread over processes, and OKS NMS must see them
    together) and rank 0 writes the one file. The NMS threshold and sigmas are the task's (``oks_nms_threshold``,
    ``sigmas``).
    """

    def __init__(self, output_file: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def _path(self, trainer: pl.Trainer) -> str:
        return self.output_file or os.path.join(trainer.log_dir or ".", "keypoints.json")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self._path(trainer)
        if os.path.exists(path):
            raise FileExistsError(f"COCOKeypointResultsWriter: {path} exists; choose another output_file (nothing "
                                  "is overwritten)")

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        batches = list(predictions)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, batches)
            batches = [b for part in gathered for b in part]
        if not trainer.is_global_zero:
            return
        records = coco_keypoint_results(batches, getattr(pl_module, "oks_nms_threshold", None),
                                        getattr(pl_module, "sigmas", None))
        path = self._path(trainer)
        if os.path.exists(path):
            raise FileExistsError(f"COCOKeypointResultsWriter: {path} appeared during predict; not overwriting it")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "x") as f:
            json.dump(records, f)
        rank_zero_info(f"wrote {len(records)} poses for {len({r['image_id'] for r in records})} images to {path}")
