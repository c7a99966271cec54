"""COCO evaluation helpers shared by the tasks that report COCO-style AP (box mAP now, keypoint OKS AP next).

Evaluation runs through torchmetrics' ``MeanAveragePrecision`` with the ``faster_coco_eval`` backend (the
pycocotools algorithm, several times faster), given pycocotools' exact float64 thresholds.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

# pycocotools' exact float64 thresholds (Params.setDetParams): torchmetrics' float32 defaults differ by ~2e-5 in AP.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist()
COCO_REC_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True).tolist()
LOGGED_MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
COCO_SUMMARY_ROWS = (
    ("Average Precision", "0.50:0.95", "all", 100, "map"),
    ("Average Precision", "0.50", "all", 100, "map_50"),
    ("Average Precision", "0.75", "all", 100, "map_75"),
    ("Average Precision", "0.50:0.95", "small", 100, "map_small"),
    ("Average Precision", "0.50:0.95", "medium", 100, "map_medium"),
    ("Average Precision", "0.50:0.95", "large", 100, "map_large"),
    ("Average Recall", "0.50:0.95", "all", 1, "mar_1"),
    ("Average Recall", "0.50:0.95", "all", 10, "mar_10"),
    ("Average Recall", "0.50:0.95", "all", 100, "mar_100"),
    ("Average Recall", "0.50:0.95", "small", 100, "mar_small"),
    ("Average Recall", "0.50:0.95", "medium", 100, "mar_medium"),
    ("Average Recall", "0.50:0.95", "large", 100, "mar_large"),
)


def coco_map_metric(**kwargs) -> MeanAveragePrecision:
    """COCO box mAP via faster_coco_eval, with pycocotools' exact IoU/recall thresholds (kwargs pass through)."""
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_REC_THRESHOLDS,
        backend="faster_coco_eval",
        **kwargs,
    )


def format_coco_table(values: dict[str, torch.Tensor], title: str = "COCO bbox evaluation",
                      rows: tuple = COCO_SUMMARY_ROWS) -> str:
    """The summary lines pycocotools prints (``COCOeval.summarize``), from a dict of metric values."""
    short = {"Average Precision": "(AP)", "Average Recall": "(AR)"}
    lines = [title]
    for name, iou, area, dets, key in rows:
        lines.append(f" {name:<18} {short[name]} @[ IoU={iou:<9} | area={area:>6} | maxDets={dets:>3} ] = "
                     f"{float(values[key]):.3f}")
    return "\n".join(lines)
