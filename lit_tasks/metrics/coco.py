"""COCO evaluation helpers shared by the tasks that report COCO-style AP (box mAP now, keypoint OKS AP next).

Evaluation runs through torchmetrics' ``MeanAveragePrecision`` with the ``faster_coco_eval`` backend (the
pycocotools algorithm, several times faster), given pycocotools' exact float64 thresholds.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.detection import MeanAveragePrecision

from lit_tasks.ops.box_ops import rescale_boxes

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


class COCOMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision whose DDP sync works when processes evaluated different numbers of images.

    torchmetrics all-gathers its per-image list states one element at a time, so processes holding different
    numbers of images pair different collectives (gloo aborts, NCCL hangs). Evaluation loaders give every image
    to exactly one process (processes differ by one image when the set does not divide), so each list state is
    gathered whole as one object instead, processes concatenated in rank order (the states stay aligned image
    by image). Ground-truth ``area`` (the annotation's, as pycocotools uses for the area ranges) is a state of
    torchmetrics' own.
    """

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        world = dist.get_world_size(group)
        for attr in self._reductions:
            local = [t.detach().cpu() for t in getattr(self, attr)]
            gathered: list[list[torch.Tensor] | None] = [None] * world
            dist.all_gather_object(gathered, local, group=group)
            setattr(self, attr, [t.to(self.device) for part in gathered for t in part])


def evaluation_target(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ground truth COCO evaluation scores against: ``target["original"]`` when the DataModule gives it (the
    dataset's annotations in original pixels, with their areas), else the training target mapped back."""
    if "original" in target:
        return target["original"]
    gt = {"boxes": rescale_boxes(target["boxes"].float(), target["size"], target["orig_size"]), "labels": target["labels"]}
    if "iscrowd" in target:
        gt["iscrowd"] = target["iscrowd"]
    return gt


def coco_map_metric(**kwargs) -> MeanAveragePrecision:
    """COCO box mAP via faster_coco_eval, with pycocotools' exact IoU/recall thresholds (kwargs pass through)."""
    return COCOMeanAveragePrecision(
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


def format_class_ap_table(values: dict[str, torch.Tensor], class_names: list[str] | None = None) -> str:
    """Per-class AP@[.5:.95] and AR@100 (in %) from a ``class_metrics=True`` result; "-" for a class without
    ground truth (pycocotools' -1)."""
    classes = [int(c) for c in values["classes"].reshape(-1).tolist()]
    names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in classes]
    ap, ar = values["map_per_class"].reshape(-1).tolist(), values["mar_100_per_class"].reshape(-1).tolist()
    width = max([len("class"), *(len(n) for n in names)])
    shown = lambda v: f"{100 * v:7.2f}" if v >= 0 else f"{'-':>7}"  # noqa: E731
    lines = [f"{'class':<{width}}  {'AP':>7}  {'AR@100':>7}", "-" * (width + 18)]
    lines += [f"{n:<{width}}  {shown(p)}  {shown(r)}" for n, p, r in zip(names, ap, ar)]
    return "\n".join(lines)


def per_class_ap(values: dict[str, torch.Tensor], class_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{"AP/<class name>": AP}`` for the classes with ground truth, from a ``class_metrics=True`` result."""
    out = {}
    for c, ap in zip(values["classes"].reshape(-1).tolist(), values["map_per_class"].reshape(-1)):
        if float(ap) >= 0:
            name = class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c))
            out[f"AP/{str(name).replace(' ', '_')}"] = ap
    return out

