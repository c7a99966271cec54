"""The task's COCO mAP (torchmetrics + faster_coco_eval) equals pycocotools' COCOeval on the same data."""

import contextlib
import io

import numpy as np
import pytest
import torch

from lit_tasks.metrics.coco import LOGGED_MAP_KEYS, coco_map_metric, format_coco_table
from lit_tasks.ops.box_ops import rescale_boxes

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
             "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def _random_scene(rng, num_images=6, num_classes=3):
    preds, targets = [], []
    for _ in range(num_images):
        n = rng.integers(0, 8)
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(4, 150, (n, 2))  # spans small, medium and large areas
        gt = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, num_classes, n)
        # predictions: jittered GT (some hits, some misses) plus random false positives
        m = rng.integers(0, 10)
        jitter = gt + rng.normal(0, 6, gt.shape)
        fp_xy = rng.uniform(0, 300, (m, 2))
        fp = np.concatenate([fp_xy, fp_xy + rng.uniform(4, 100, (m, 2))], 1)
        boxes = np.concatenate([jitter, fp])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        plabels = np.concatenate([labels, rng.integers(0, num_classes, m)])
        scores = rng.uniform(0.05, 1, len(boxes))
        crowd = (rng.uniform(size=n) < 0.15).astype(np.int64)
        # COCO's area is the segmentation's, smaller than the box: pycocotools' area ranges use it, not w * h.
        area = (wh[:, 0] * wh[:, 1] * rng.uniform(0.3, 1.0, n)).astype(np.float32)
        targets.append({"boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(labels),
                        "iscrowd": torch.tensor(crowd), "area": torch.tensor(area)})
        preds.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(plabels),
                      "scores": torch.tensor(scores, dtype=torch.float32)})
    return preds, targets


def _pycocotools_stats(preds, targets, num_classes=3):
    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i, "width": 500, "height": 500})
        for b, c, crowd, area in zip(t["boxes"].tolist(), t["labels"].tolist(), t["iscrowd"].tolist(),
                                     t["area"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [b[0], b[1], w, h],
                         "area": area, "iscrowd": crowd})
        for b, c, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            dets.append({"image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_pycocotools(seed):
    preds, targets = _random_scene(np.random.default_rng(seed))
    metric = coco_map_metric()
    metric.update(preds[:3], targets[:3])  # two updates, as over two validation batches
    metric.update(preds[3:], targets[3:])
    ours = metric.compute()
    ref = _pycocotools_stats(preds, targets)
    for key, value in zip(STAT_KEYS, ref):
        assert float(ours[key]) == pytest.approx(value, abs=1e-6), key
    # The areas matter: with box areas instead, the small / medium / large numbers change.
    boxed = coco_map_metric()
    boxed.update(preds, [{k: v for k, v in t.items() if k != "area"} for t in targets])
    by_box = boxed.compute()
    assert any(abs(float(by_box[k]) - float(ours[k])) > 1e-3 for k in ("map_small", "map_medium", "map_large"))
    assert set(LOGGED_MAP_KEYS) <= set(ours)
    table = format_coco_table(ours)
    assert f"{ref[1]:.3f}" in table.splitlines()[2]


def test_rescale_boxes_to_original_size():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    # network input 128 x 256 (h, w) from an original 256 x 1024 image
    out = rescale_boxes(boxes, torch.tensor([128, 256]), torch.tensor([256, 1024]))
    assert out.tolist() == [[40.0, 40.0, 120.0, 80.0]]


def test_per_class_table_equals_pycocotools_per_category():
    from lit_tasks.metrics.coco import format_class_ap_table, per_class_ap

    preds, targets = _random_scene(np.random.default_rng(3))
    metric = coco_map_metric(class_metrics=True)
    metric.update(preds, targets)
    ours = metric.compute()
    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i, "width": 500, "height": 500})
        for b, c, crowd, area in zip(t["boxes"].tolist(), t["labels"].tolist(), t["iscrowd"].tolist(), t["area"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "area": area, "iscrowd": crowd})
        for b, c, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            dets.append({"image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    names = ["ant", "bee", "cow"]
    logged = per_class_ap(ours, names)
    table = format_class_ap_table(ours, names).splitlines()
    for c in range(3):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(3)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.params.catIds = [c]  # pycocotools' per-category AP
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert float(logged[f"AP/{names[c]}"]) == pytest.approx(ev.stats[0], abs=1e-6)
        row = next(line for line in table if line.startswith(names[c]))
        assert f"{100 * ev.stats[0]:.2f}" in row
