"""Pose metrics: PCK / AUC / EPE against NumPy ports of mmpose's rules, OKS AP against pycocotools."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_tasks.metrics.pose import EPE, KEYPOINT_AP_KEYS, PCK, PCKAUC, KeypointAP, format_keypoint_table
from lit_tasks.ops.oks import COCO_KEYPOINT_SIGMAS


# ----------------------------------------------------------------------------- mmpose rules, NumPy port
def _mm_calc_distances(preds, gts, mask, norm_factor):
    """mmpose ``_calc_distances``: (K, N) distances, -1 where invalid."""
    n, k, _ = preds.shape
    _mask = mask.copy() > 0
    _mask[np.where((norm_factor == 0).sum(1))[0], :] = False
    distances = np.full((n, k), -1, dtype=np.float32)
    norm_factor = norm_factor.copy()
    norm_factor[np.where(norm_factor <= 0)] = 1e6
    distances[_mask] = np.linalg.norm(((preds - gts) / norm_factor[:, None, :])[_mask], axis=-1)
    return distances.T


def _mm_distance_acc(distances, thr):
    valid = distances != -1
    if valid.sum() > 0:
        return (distances[valid] < thr).sum() / valid.sum()
    return -1


def _mm_pck(pred, gt, mask, thr, norm_factor):
    """mmpose ``keypoint_pck_accuracy`` -> (acc per keypoint, avg_acc, cnt)."""
    distances = _mm_calc_distances(pred, gt, mask, norm_factor)
    acc = np.array([_mm_distance_acc(d, thr) for d in distances])
    valid_acc = acc[acc >= 0]
    cnt = len(valid_acc)
    return acc, (valid_acc.mean() if cnt > 0 else 0), cnt


def _bbox_norm(boxes_xyxy):
    """mmpose PCKAccuracy(norm_item='bbox'): max(w, h) repeated on both axes."""
    size = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
    return np.max(size, axis=1, keepdims=True).repeat(2, axis=1)


def _mm_auc_bbox(pred, gt, mask, boxes, num_thrs=20):
    """mmpose ``keypoint_auc`` with the per-instance bbox normalisation in place of its scalar."""
    nor = _bbox_norm(boxes)
    return float(np.mean([_mm_pck(pred, gt, mask, i / num_thrs, nor)[1] for i in range(num_thrs)]))


def _hand_case():
    """4 instances x 4 keypoint types; distances are multiples of 1 px on boxes 100 px wide or tall.

    instance 0: box 100 x 50 -> norm 100; errors 2, 4, 7, 30 px (keypoint 3 unlabelled)
    instance 1: box 40 x 100 -> norm 100; errors 0, 6, 1, 3 px
    instance 2: box 0 x 0 (zero size)    -> ignored entirely
    instance 3: box 20 x 100 -> norm 100; errors 12, 4.9, 5.1, 0 px (keypoint 0 unlabelled)
    Keypoint type 3 has labelled instances 1 and 3 only.
    """
    gt = np.zeros((4, 4, 2))
    gt[:, :, 0] = np.arange(4)[None] * 10 + 5
    gt[:, :, 1] = 20
    err = np.array([[2, 4, 7, 30], [0, 6, 1, 3], [1, 1, 1, 1], [12, 4.9, 5.1, 0]], dtype=np.float64)
    angle = np.array([0.3, 1.1, 2.0, -0.7])
    pred = gt + err[..., None] * np.stack([np.cos(angle), np.sin(angle)])[None].transpose(0, 2, 1)
    visible = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)
    boxes = np.array([[0, 0, 100, 50], [10, 0, 50, 100], [5, 5, 5, 5], [0, 0, 20, 100]], dtype=np.float64)
    return pred, gt, visible, boxes


def _t(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def test_pck_hand_case_and_mmpose_port() -> None:
    pred, gt, visible, boxes = _hand_case()
    metric = PCK(num_keypoints=4, threshold=0.05)
    metric.update(*_t(pred, gt, visible, boxes))
    got = metric.compute().item()
    # By hand at 5 px: type 0 -> {2 ok, 0 ok} = 1; type 1 -> {4 ok, 6 no, 4.9 ok} = 2/3;
    # type 2 -> {7 no, 1 ok, 5.1 no} = 1/3; type 3 -> {3 ok, 0 ok} = 1.  Mean = (1 + 2/3 + 1/3 + 1) / 4.
    assert got == pytest.approx((1 + 2 / 3 + 1 / 3 + 1) / 4, abs=1e-12)
    _, want, _ = _mm_pck(pred, gt, visible, 0.05, _bbox_norm(boxes))
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("thr", [0.02, 0.05, 0.1, 0.2])
def test_pck_matches_mmpose_port_random(thr: float) -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 200, size=(30, 6, 2))
    pred = gt + rng.normal(0, 6, size=gt.shape)
    visible = rng.random((30, 6)) > 0.3
    visible[:, 5] = False  # a keypoint type never labelled: excluded from the mean
    xy = rng.uniform(0, 100, size=(30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 150, size=(30, 2))], axis=1)
    boxes[3, 2:] = boxes[3, :2]  # zero-size instance
    metric = PCK(num_keypoints=6, threshold=thr)
    metric.update(*_t(pred, gt, visible, boxes))
    _, want, _ = _mm_pck(pred, gt, visible, thr, _bbox_norm(boxes))
    assert metric.compute().item() == pytest.approx(want, abs=1e-6)


def test_auc_matches_mmpose_port_and_split_invariance() -> None:
    rng = np.random.default_rng(1)
    gt = rng.uniform(0, 200, size=(25, 5, 2))
    pred = gt + rng.normal(0, 15, size=gt.shape)
    visible = rng.random((25, 5)) > 0.2
    xy = rng.uniform(0, 100, size=(25, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 150, size=(25, 2))], axis=1)
    want = _mm_auc_bbox(pred, gt, visible, boxes)
    one = PCKAUC(num_keypoints=5)
    one.update(*_t(pred, gt, visible, boxes))
    assert one.compute().item() == pytest.approx(want, abs=1e-6)
    split = PCKAUC(num_keypoints=5)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 25)):  # uneven batches give the same result
        split.update(*_t(pred[sl], gt[sl], visible[sl], boxes[sl]))
    assert split.compute().item() == pytest.approx(want, abs=1e-6)
    pred_hand, gt_hand, vis_hand, boxes_hand = _hand_case()
    hand = PCKAUC(num_keypoints=4)
    hand.update(*_t(pred_hand, gt_hand, vis_hand, boxes_hand))
    assert hand.compute().item() == pytest.approx(_mm_auc_bbox(pred_hand, gt_hand, vis_hand, boxes_hand), abs=1e-6)


def test_pck_nothing_valid_is_zero() -> None:
    metric = PCK(num_keypoints=3)
    metric.update(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 4))
    assert metric.compute().item() == 0.0


def test_epe() -> None:
    pred, gt, visible, boxes = _hand_case()
    metric = EPE()
    metric.update(*_t(pred, gt, visible))
    dist = np.linalg.norm(pred - gt, axis=-1)
    assert metric.compute().item() == pytest.approx(dist[visible].mean(), abs=1e-9)


def test_pose_metric_shape_errors() -> None:
    with pytest.raises(ValueError, match="visible"):
        PCK(3).update(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4))
    with pytest.raises(ValueError, match="expected 3 keypoints"):
        PCK(3).update(torch.zeros(2, 4, 2), torch.zeros(2, 4, 2), torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4))


# ----------------------------------------------------------------------------- OKS AP vs pycocotools
def _random_coco(seed: int, k: int, num_images: int = 6):
    """GT json dict + results list: people with noisy predictions, crowd regions, 0-keypoint people, false positives."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    ann_id = 900100000000  # COCO crowd ids are this large: must survive the float64 rows exactly
    for img in range(1, num_images + 1):
        images.append({"id": img * 7, "width": 640, "height": 480})
        for _ in range(int(rng.integers(0, 5))):
            ann_id += int(rng.integers(1, 5))
            w, h = rng.uniform(20, 200, size=2)
            x, y = rng.uniform(0, 400), rng.uniform(0, 280)
            kx, ky = x + rng.uniform(0, w, size=k), y + rng.uniform(0, h, size=k)
            v = rng.choice([0, 1, 2], size=k, p=[0.2, 0.2, 0.6])
            crowd = int(rng.random() < 0.1)
            if rng.random() < 0.1:
                v[:] = 0  # a person with no labelled keypoint (ignored by COCOeval)
            kpts = np.stack([np.where(v > 0, kx, 0), np.where(v > 0, ky, 0), v], axis=1)
            anns.append({"id": ann_id, "image_id": img * 7, "category_id": 1, "bbox": [x, y, w, h],
                         "area": float(w * h * rng.uniform(0.4, 0.9)), "iscrowd": crowd,
                         "num_keypoints": int((v > 0).sum()), "keypoints": kpts.reshape(-1).tolist()})
            if rng.random() < 0.9:
                noise = rng.normal(0, rng.uniform(1, 15), size=(k, 2))
                pk = np.stack([kx + noise[:, 0], ky + noise[:, 1], rng.random(k)], axis=1)
                results.append({"image_id": img * 7, "category_id": 1, "score": float(rng.random()),
                                "keypoints": pk.reshape(-1).tolist()})
        for _ in range(int(rng.integers(0, 3))):  # false positives
            pk = np.stack([rng.uniform(0, 640, k), rng.uniform(0, 480, k), rng.random(k)], axis=1)
            results.append({"image_id": img * 7, "category_id": 1, "score": float(rng.random()),
                            "keypoints": pk.reshape(-1).tolist()})
    cats = [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(k)], "skeleton": []}]
    return {"images": images, "annotations": anns, "categories": cats}, results


def _pycocotools_stats(tmp_path: Path, gt: dict, results: list, sigmas) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    coco_dt = coco_gt.loadRes(str(tmp_path / "res.json"))
    ev = COCOeval(coco_gt, coco_dt, iouType="keypoints")
    ev.params.kpt_oks_sigmas = np.asarray(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats)


def _feed(metric: KeypointAP, gt: dict, results: list, k: int, chunks: int = 1) -> None:
    """Send GT per annotation and predictions in ``chunks`` uneven pieces, GT of each image twice (dedup)."""
    anns = gt["annotations"]
    for part in np.array_split(np.arange(len(anns)), chunks):
        sel = [anns[i] for i in part]
        for _ in range(2):
            metric.update(targets={
                "keypoints": torch.tensor([a["keypoints"] for a in sel], dtype=torch.float64).reshape(-1, k, 3),
                "boxes": torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                        a["bbox"][1] + a["bbox"][3]] for a in sel], dtype=torch.float64).reshape(-1, 4),
                "area": torch.tensor([a["area"] for a in sel], dtype=torch.float64),
                "image_id": torch.tensor([a["image_id"] for a in sel]),
                "id": torch.tensor([a["id"] for a in sel]),
                "iscrowd": torch.tensor([a["iscrowd"] for a in sel]),
            })
    for part in np.array_split(np.arange(len(results)), chunks):
        sel = [results[i] for i in part]
        metric.update(preds={
            "keypoints": torch.tensor([r["keypoints"] for r in sel], dtype=torch.float64).reshape(-1, k, 3),
            "scores": torch.tensor([r["score"] for r in sel], dtype=torch.float64),
            "image_id": torch.tensor([r["image_id"] for r in sel]),
        })
    # Images without any annotation must still be evaluated: send them as empty GT.
    annotated = {a["image_id"] for a in anns}
    for img in gt["images"]:
        if img["id"] not in annotated:
            metric.update(targets={"keypoints": torch.zeros(0, k, 3), "boxes": torch.zeros(0, 4),
                                   "area": torch.zeros(0),
                                   "image_id": torch.zeros(0), "id": torch.zeros(0)})


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("seed, k", [(0, 17), (1, 5)])
def test_keypoint_ap_equals_pycocotools(tmp_path: Path, backend: str, seed: int, k: int) -> None:
    gt, results = _random_coco(seed, k)
    sigmas = COCO_KEYPOINT_SIGMAS if k == 17 else tuple(np.linspace(0.03, 0.1, k))
    want = _pycocotools_stats(tmp_path, gt, [dict(r) for r in results], sigmas)
    assert want[0] > 0.05 and want[0] < 0.95  # a non-trivial case
    metric = KeypointAP(sigmas=sigmas, backend=backend)
    _feed(metric, gt, results, k, chunks=3)
    got = metric.compute()
    assert list(got) == list(KEYPOINT_AP_KEYS)
    np.testing.assert_allclose([got[key].item() for key in KEYPOINT_AP_KEYS], want[:10], atol=1e-6, rtol=0)


def test_keypoint_ap_empty_predictions_and_table(tmp_path: Path) -> None:
    gt, _ = _random_coco(2, 17)
    metric = KeypointAP(backend="pycocotools")
    _feed(metric, gt, [], 17)
    got = metric.compute()
    assert got["map"].item() == 0.0 and got["mar"].item() == 0.0
    table = format_keypoint_table(got)
    assert "maxDets= 20" in table and table.count("\n") == 10


def test_keypoint_ap_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(P, 17, 2\|3\)"):
        KeypointAP().update(preds={"keypoints": torch.zeros(1, 5, 3), "scores": torch.zeros(1),
                                   "image_id": torch.zeros(1)})
    with pytest.raises(ValueError, match="backend"):
        KeypointAP(backend="coco")


# ----------------------------------------------------------------------------- 2 processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gt, results = _random_coco(0, 17)
        pred, target, visible, boxes = _hand_case()
        ap, pck = KeypointAP(backend="pycocotools"), PCK(num_keypoints=4)
        if rank == 0:  # rank 0 gets everything of the pose case but 1 instance, and all the OKS data
            _feed(ap, gt, results, 17, chunks=2)
            pck.update(*_t(pred[:3], target[:3], visible[:3], boxes[:3]))
        else:  # rank 1 gets one PCK instance and no OKS data at all (its cat states stay empty)
            pck.update(*_t(pred[3:], target[3:], visible[3:], boxes[3:]))
        values = {key: v.item() for key, v in ap.compute().items()}
        values["pck"] = pck.compute().item()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawning 2 interpreters that import torch: ~20 s idle, ~90 s on a loaded 2-core machine
def test_two_process_sync_equals_single_process(tmp_path: Path) -> None:
    """DDP (gloo): uneven split, one rank with no OKS data at all; both ranks compute the 1-process values."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    gt, results = _random_coco(0, 17)
    single = KeypointAP(backend="pycocotools")
    _feed(single, gt, results, 17)
    pck = PCK(num_keypoints=4)
    pck.update(*_t(*_hand_case()))
    want = {key: v.item() for key, v in single.compute().items()}
    want["pck"] = pck.compute().item()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(want, abs=1e-12)
