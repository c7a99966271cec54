"""Write `lit-tasks predict` detections as a COCO results json (what COCO's evaluation server takes)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


def coco_results(predictions: Sequence[dict], label_to_category_id: dict[int, int] | None = None) -> list[dict]:
    """Per-image ``{boxes (xyxy), scores, labels, image_id}`` -> COCO result records with xywh boxes."""
    records = []
    for pred in predictions:
        image_id = int(pred["image_id"])
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            category = label_to_category_id[int(label)] if label_to_category_id else int(label)
            records.append({"image_id": image_id, "category_id": category,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return records


class COCOResultsWriter(BasePredictionWriter):
    """At the end of `predict`, write every detection to ``output_file`` (default ``<log_dir>/predictions.json``).

    Labels are mapped back to dataset category ids with the DataModule's ``label_to_category_id`` when it
    has one. Refuses to overwrite an existing file unless ``overwrite=True``. Single-process runs write
    directly; under DDP each rank writes ``<name>.rank<k>.json``.
    """

    def __init__(self, output_file: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file
        self.overwrite = overwrite

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        path = self.output_file or os.path.join(trainer.log_dir or ".", "predictions.json")
        if trainer.world_size > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{trainer.global_rank}{ext}"
        if os.path.exists(path) and not self.overwrite:
            raise FileExistsError(f"COCOResultsWriter: {path} exists; pass overwrite=True or another output_file")
        flat = [p for batch in predictions for p in batch]
        mapping = getattr(trainer.datamodule, "label_to_category_id", None)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(coco_results(flat, mapping), f)
        print(f"wrote {sum(len(p['boxes']) for p in flat)} detections for {len(flat)} images to {path}")
