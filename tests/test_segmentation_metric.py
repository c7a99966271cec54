"""SegmentationMetrics: confusion matrix and PA / MPA / mIoU / FWIoU against independent references."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_tasks.metrics.segmentation import SegmentationMetrics, confusion_matrix_update, segmentation_scores

IGNORE = 255


def random_maps(num_classes: int, shape=(3, 17, 23), seed: int = 0, ignore_fraction: float = 0.2):
    """Random (preds, target) label maps; ~ignore_fraction of target pixels set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    # Predictions agree with the target half of the time so IoUs are far from both 0 and 1.
    noise = torch.randint(0, num_classes, shape, generator=g)
    preds = torch.where(torch.rand(shape, generator=g) < 0.5, target, noise)
    target[torch.rand(shape, generator=g) < ignore_fraction] = IGNORE
    return preds, target


def numpy_confmat(preds: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    """Reference: the pytorch-deeplab-xception Evaluator accumulation (REFERENCE §7.1)."""
    keep = (target >= 0) & (target < c)
    return np.bincount(c * target[keep].astype(int) + preds[keep], minlength=c * c).reshape(c, c)


def mmseg_style_scores(preds: np.ndarray, target: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Reference by areas, as mmseg's IoUMetric (histograms of intersection, prediction, label), float64."""
    keep = target != IGNORE
    p, t = preds[keep], target[keep]
    inter = np.histogram(p[p == t], bins=c, range=(0, c))[0].astype(np.float64)
    area_p = np.histogram(p, bins=c, range=(0, c))[0].astype(np.float64)
    area_t = np.histogram(t, bins=c, range=(0, c))[0].astype(np.float64)
    union = area_p + area_t - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / area_t
    present = area_t > 0
    return {
        "PA": inter.sum() / area_t.sum(),
        "MPA": np.nanmean(acc),
        "mIoU": np.nanmean(iou),
        "FWIoU": np.sum(area_t[present] / area_t.sum() * iou[present]),
        "IoU": iou,
        "Acc": acc,
    }


@pytest.mark.parametrize("num_classes", [2, 7, 21])
def test_confusion_matrix_equals_numpy_and_sklearn(num_classes):
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix  # imported here: spawned DDP workers skip it

    preds, target = random_maps(num_classes, seed=num_classes)
    metric = SegmentationMetrics(num_classes, ignore_index=IGNORE)
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])  # accumulation over batches == one pass
    cm = metric.compute()["confmat"].numpy()
    p, t = preds.numpy().ravel(), target.numpy().ravel()
    np.testing.assert_array_equal(cm, numpy_confmat(p, t, num_classes))
    keep = t != IGNORE
    np.testing.assert_array_equal(cm, sk_confusion_matrix(t[keep], p[keep], labels=list(range(num_classes))))
    assert cm.sum() == keep.sum()  # ignored pixels are dropped, every other pixel counted once


def test_scores_equal_float64_formulas():
    c = 6
    preds, target = random_maps(c, seed=3)
    target[target == 4] = 1  # class 4 only predicted: IoU 0, counted in mIoU
    preds[preds == 5] = 0
    target[target == 5] = 0  # class 5 absent from both: NaN, excluded from the means
    scores = segmentation_scores(confusion_matrix_update(preds, target, c))
    ref = mmseg_style_scores(preds.numpy().ravel(), target.numpy().ravel(), c)
    for key in ("PA", "MPA", "mIoU", "FWIoU"):
        assert scores[key].dtype == torch.float64
        assert abs(float(scores[key]) - float(ref[key])) <= 1e-12, key
    np.testing.assert_allclose(scores["IoU"].numpy(), ref["IoU"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(scores["Acc"].numpy(), ref["Acc"], rtol=0, atol=1e-12, equal_nan=True)
    assert float(scores["IoU"][4]) == 0.0 and np.isnan(float(scores["Acc"][4]))
    assert np.isnan(float(scores["IoU"][5]))


def test_hand_worked_example():
    # GT      Pred     (C = 3, one ignored pixel)
    # 0 0 1   0 1 1
    # 1 2 X   1 1 0
    target = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]]])
    preds = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    s = segmentation_scores(confusion_matrix_update(preds, target, 3))
    assert s["confmat"].tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    iou = [1 / 2, 2 / 4, 0 / 1]
    assert s["IoU"].tolist() == pytest.approx(iou, abs=1e-15)
    assert float(s["PA"]) == pytest.approx(3 / 5, abs=1e-15)
    assert float(s["MPA"]) == pytest.approx((1 / 2 + 1 + 0) / 3, abs=1e-15)
    assert float(s["mIoU"]) == pytest.approx(sum(iou) / 3, abs=1e-15)
    assert float(s["FWIoU"]) == pytest.approx(2 / 5 * 1 / 2 + 2 / 5 * 1 / 2 + 1 / 5 * 0, abs=1e-15)


def test_miou_equals_torchmetrics_jaccard():
    from torchmetrics.classification import MulticlassJaccardIndex

    c = 9
    preds, target = random_maps(c, shape=(4, 31, 29), seed=11)
    target[target == 8] = 7  # class 8 only predicted
    preds[preds == 6] = 2
    target[target == 6] = 2  # class 6 absent everywhere: both libraries skip it
    ours = SegmentationMetrics(c, ignore_index=IGNORE)
    theirs = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=IGNORE)
    per_class = MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=IGNORE)
    for i in range(4):
        ours.update(preds[i : i + 1], target[i : i + 1])
        theirs.update(preds[i : i + 1], target[i : i + 1])
        per_class.update(preds[i : i + 1], target[i : i + 1])
    s = ours.compute()
    assert float(s["mIoU"]) == pytest.approx(float(theirs.compute()), abs=1e-6)
    present = ~torch.isnan(s["IoU"])
    torch.testing.assert_close(s["IoU"][present].float(), per_class.compute()[present], rtol=0, atol=1e-6)


def test_absent_class_does_not_drag_miou_down():
    c = 5
    target = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    s = segmentation_scores(confusion_matrix_update(target.clone(), target, c))  # perfect on classes 0..2
    assert float(s["mIoU"]) == 1.0 and float(s["MPA"]) == 1.0 and float(s["FWIoU"]) == 1.0
    assert torch.isnan(s["IoU"][3:]).all()
    # A class that is only predicted has IoU 0 and does count.
    preds = target.clone()
    preds[0, 0, 0] = 4
    s = segmentation_scores(confusion_matrix_update(preds, target, c))
    assert float(s["IoU"][4]) == 0.0
    assert float(s["mIoU"]) == pytest.approx(float(s["IoU"][:3].sum()) / 4, abs=1e-15)


def test_all_ignore_batch_contributes_nothing_and_empty_metric_is_nan():
    metric = SegmentationMetrics(4, ignore_index=IGNORE)
    metric.update(torch.zeros(1, 5, 5, dtype=torch.long), torch.full((1, 5, 5), IGNORE))
    s = metric.compute()
    assert s["confmat"].sum() == 0
    assert all(np.isnan(float(s[k])) for k in ("PA", "MPA", "mIoU", "FWIoU"))
    preds, target = random_maps(4, seed=5)
    metric.update(preds, target)
    torch.testing.assert_close(metric.compute()["confmat"], confusion_matrix_update(preds, target, 4), rtol=0, atol=0)


def test_logits_and_uint8_inputs_equal_label_inputs():
    c = 4
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, c, 9, 11, generator=g)
    target = torch.randint(0, c, (2, 9, 11), generator=g)
    target[0, :2] = IGNORE
    a = confusion_matrix_update(logits, target, c)
    b = confusion_matrix_update(logits.argmax(1), target, c)
    u8 = confusion_matrix_update(logits.argmax(1).to(torch.uint8), target.to(torch.uint8), c)
    assert torch.equal(a, b) and torch.equal(a, u8)


def test_bad_input_raises_clear_errors():
    metric = SegmentationMetrics(3, ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"\[7\].*outside \[0, 3\)"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, IGNORE]]]))
    with pytest.raises(ValueError, match="predicted class ids"):
        metric.update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match="does not match"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index=1"):
        SegmentationMetrics(3, ignore_index=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, preds: torch.Tensor, target: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = SegmentationMetrics(5, ignore_index=IGNORE)
        for i in range(rank, preds.shape[0], world):  # each rank sees a disjoint share of the images
            metric.update(preds[i : i + 1], target[i : i + 1])
        scores = metric.compute()
        if rank == 0:
            torch.save({k: v.clone() for k, v in scores.items()}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process(tmp_path):
    preds, target = random_maps(5, shape=(5, 13, 12), seed=7)
    out = str(tmp_path / "scores.pt")
    # spawn, not fork: forking a process whose OpenMP/gloo threads are running can deadlock the child.
    method = "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), preds, target, out), nprocs=2, join=True,
                       start_method=method)  # fmt: skip
    ddp = torch.load(out)
    single = SegmentationMetrics(5, ignore_index=IGNORE)
    single.update(preds, target)
    ref = single.compute()
    assert torch.equal(ddp["confmat"], ref["confmat"])
    for key in ("PA", "MPA", "mIoU", "FWIoU"):
        assert float(ddp[key]) == float(ref[key])
