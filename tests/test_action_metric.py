"""Per-frame AP / cAP (lit_tasks.metrics.action) against the OadTR loop, sklearn and hand-worked cases."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score

from lit_tasks.metrics.action import FrameLevelMAP, frame_ap_cap


def oadtr_loop(probs: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    """Direct NumPy port of OadTR's ``frame_level_map_n_cap`` inner loop, for every column of (N, K) inputs.

    Returns per-class AP and cAP (the reference then skips class 0 and averages; here every column counts).
    """
    aps, caps = [], []
    for i in range(labels.shape[1]):
        prob, gt = probs[:, i], labels[:, i]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.sum(gt == 0) / np.sum(gt == 1)
        tp, psum, cpsum = 0, 0.0, 0.0
        for k, idx in enumerate(np.argsort(-prob)):
            if gt[idx] == 1:
                tp += 1
                wtp = w * tp
                fp = (k + 1) - tp
                psum += tp / (tp + fp)
                with np.errstate(invalid="ignore"):
                    cpsum += wtp / (wtp + fp)
        with np.errstate(invalid="ignore"):
            aps.append(psum / np.sum(gt))
            caps.append(cpsum / np.sum(gt))
    return aps, caps


def random_frames(n: int, k: int, seed: int, pos_rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.random((n, k))  # continuous float64: no ties
    labels = (rng.random((n, k)) < pos_rate).astype(np.float64)
    labels[0] = 1.0  # every class has a positive
    return scores, labels


def as_tensors(scores: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(scores), torch.from_numpy(labels).bool()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_cap_equal_oadtr_loop_without_ties(seed: int) -> None:
    scores, labels = random_frames(777, 11, seed, pos_rate=[0.05, 0.2, 0.5][seed])
    ap, cap = frame_ap_cap(*as_tensors(scores, labels), chunk=4)
    ref_ap, ref_cap = oadtr_loop(scores, labels)
    # Same float64 operations per positive; only the order of the final sums differs (N terms <= 1).
    tol = 777 * np.finfo(np.float64).eps
    np.testing.assert_allclose(ap.numpy(), ref_ap, rtol=0, atol=tol)
    np.testing.assert_allclose(cap.numpy(), ref_cap, rtol=0, atol=tol)
    assert not np.allclose(ap.numpy(), cap.numpy())  # calibration changes imbalanced classes


def test_ap_equals_sklearn_without_ties() -> None:
    scores, labels = random_frames(1000, 7, 3)
    ap, _ = frame_ap_cap(*as_tensors(scores, labels))
    expected = [average_precision_score(labels[:, c], scores[:, c]) for c in range(7)]
    np.testing.assert_allclose(ap.numpy(), expected, rtol=0, atol=1e-12)


def test_ties_are_grouped_like_sklearn_and_do_not_depend_on_frame_order() -> None:
    rng = np.random.default_rng(4)
    scores = np.round(rng.random((400, 5)), 1)  # 11 distinct values: many ties
    labels = (rng.random((400, 5)) < 0.3).astype(np.float64)
    ap, cap = frame_ap_cap(*as_tensors(scores, labels))
    expected = [average_precision_score(labels[:, c], scores[:, c]) for c in range(5)]
    np.testing.assert_allclose(ap.numpy(), expected, rtol=0, atol=1e-12)
    perm = rng.permutation(400)
    ap_p, cap_p = frame_ap_cap(*as_tensors(scores[perm], labels[perm]))
    np.testing.assert_allclose(ap_p.numpy(), ap.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cap_p.numpy(), cap.numpy(), rtol=0, atol=1e-12)
    # The reference loop, by contrast, depends on the order of tied frames.
    loop_a, _ = oadtr_loop(scores, labels)
    loop_b, _ = oadtr_loop(scores[perm], labels[perm])
    assert np.abs(np.array(loop_a) - np.array(loop_b)).max() > 1e-6


def test_hand_worked_ap_and_cap() -> None:
    # Ranked labels 1,0,0,0,1: AP = (1/1 + 2/5) / 2 = 0.7; w = 3/2, cAP = (1 + 3 / (3 + 3)) / 2 = 0.75.
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5]], dtype=torch.float64)
    labels = torch.tensor([[1], [0], [0], [0], [1]], dtype=torch.bool)
    ap, cap = frame_ap_cap(scores, labels)
    assert ap.item() == pytest.approx(0.7, abs=1e-15)
    assert cap.item() == pytest.approx(0.75, abs=1e-15)
    # Ties: scores 0.9, 0.5 (x2: a positive listed before a negative) -> the tied positive gets precision
    # 2/3, the precision of the whole group, not 2/2 as an order-based walk would give.
    ap, _ = frame_ap_cap(torch.tensor([[0.9], [0.5], [0.5]]), torch.tensor([[1], [1], [0]], dtype=torch.bool))
    assert ap.item() == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)


def test_cap_equals_ap_when_positives_and_negatives_balance() -> None:
    rng = np.random.default_rng(5)
    scores = rng.random((300, 6))
    labels = np.zeros((300, 6))
    for c in range(6):
        labels[rng.permutation(300)[:150], c] = 1.0
    ap, cap = frame_ap_cap(*as_tensors(scores, labels))
    np.testing.assert_allclose(cap.numpy(), ap.numpy(), rtol=0, atol=1e-14)


def test_degenerate_classes() -> None:
    rng = np.random.default_rng(6)
    scores = torch.from_numpy(rng.random((50, 3)))
    labels = torch.zeros(50, 3, dtype=torch.bool)
    labels[:, 1] = True  # every frame positive: no negative
    labels[::7, 2] = True
    ap, cap = frame_ap_cap(scores, labels)
    assert torch.isnan(ap[0]) and torch.isnan(cap[0])  # no positive (the loop: 0/0 too)
    assert ap[1].item() == 1.0 and cap[1].item() == 1.0  # no negative (the loop's cAP: 0/0)
    loop_ap, loop_cap = oadtr_loop(scores.numpy(), labels.numpy().astype(np.float64))
    assert np.isnan(loop_ap[0]) and np.isnan(loop_cap[1])
    ap, cap = frame_ap_cap(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.bool))
    assert ap.shape == (2,) and torch.isnan(ap).all() and torch.isnan(cap).all()


def one_hot(labels: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[labels]


def make_eval_set(n: int = 600, c: int = 6, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Softmax-like scores and one-hot targets over C = 6 columns: 0 background, 5 ambiguous."""
    rng = np.random.default_rng(seed)
    cls = rng.choice(c, size=n, p=[0.4, 0.15, 0.15, 0.1, 0.1, 0.1])
    logits = rng.normal(size=(n, c)) + 1.5 * one_hot(cls, c)
    probs = np.exp(logits[:, :5]) / np.exp(logits[:, :5]).sum(1, keepdims=True)
    probs = np.concatenate([probs, np.full((n, 1), 0.123)], 1)  # ambiguous column: ignored
    return torch.from_numpy(probs).float(), torch.from_numpy(one_hot(cls, c)).float(), cls


def test_metric_drops_ambiguous_and_averages_action_classes() -> None:
    probs, targets, cls = make_eval_set()
    metric = FrameLevelMAP(num_classes=6, background_index=0, ambiguous_index=5)
    metric.update(probs, targets)
    out = metric.compute()
    keep = cls != 5
    p, y = probs[keep].double().numpy(), targets[keep].numpy()
    ref_ap, ref_cap = oadtr_loop(p[:, 1:5], y[:, 1:5].astype(np.float64))
    tol = 600 * np.finfo(np.float64).eps
    np.testing.assert_allclose(out["AP"][1:5].numpy(), ref_ap, rtol=0, atol=tol)
    np.testing.assert_allclose(out["cAP"][1:5].numpy(), ref_cap, rtol=0, atol=tol)
    assert torch.isnan(out["AP"][[0, 5]]).all() and torch.isnan(out["cAP"][[0, 5]]).all()
    assert out["mAP"].item() == pytest.approx(np.mean(ref_ap), abs=tol)
    assert out["mcAP"].item() == pytest.approx(np.mean(ref_cap), abs=tol)
    # Without dropping the ambiguous frames (they become negatives of every class) the figures change.
    other = FrameLevelMAP(num_classes=6, background_index=0, ambiguous_index=None)
    other.update(probs, targets)
    assert abs(other.compute()["mAP"].item() - out["mAP"].item()) > 1e-4


def test_metric_is_independent_of_batching_order_and_duplicates() -> None:
    probs, targets, _ = make_eval_set(seed=8)
    session = torch.arange(600) // 100
    frame = torch.arange(600) % 100
    whole = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    whole.update(probs, targets, session, frame)
    expected = whole.compute()

    perm = torch.from_numpy(np.random.default_rng(9).permutation(600))
    split = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    for chunk in torch.tensor_split(perm, [7, 250, 251, 480]):  # uneven batches, one of size 1
        split.update(probs[chunk], targets[chunk], session[chunk], frame[chunk])
    dup = perm[:33]  # a padding sampler repeats samples
    split.update(probs[dup], targets[dup], session[dup], frame[dup])
    got = split.compute()
    for key in ("AP", "cAP", "mAP", "mcAP"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-12, equal_nan=True)

    no_keys = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    no_keys.update(probs, targets)
    no_keys.update(probs[dup], targets[dup])  # without keys, duplicates count twice
    assert abs(no_keys.compute()["mAP"].item() - expected["mAP"].item()) > 1e-6


def test_metric_drops_unlabelled_rows_and_handles_missing_classes() -> None:
    probs, targets, cls = make_eval_set(seed=10)
    targets[cls == 3] = 0.0  # class 3 never positive -> NaN, left out of the means; its rows unlabelled
    metric = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    metric.update(probs, targets)
    out = metric.compute()
    assert torch.isnan(out["AP"][3])
    assert out["mAP"].item() == pytest.approx(out["AP"][[1, 2, 4]].mean().item(), abs=1e-15)
    keep = (cls != 5) & (cls != 3)
    ref_ap, _ = oadtr_loop(probs[keep].double().numpy()[:, [1, 2, 4]], targets[keep].double().numpy()[:, [1, 2, 4]])
    np.testing.assert_allclose(out["AP"][[1, 2, 4]].numpy(), ref_ap, rtol=0, atol=1e-12)

    empty = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns that compute runs before update
        result = empty.compute()
    assert torch.isnan(result["mAP"]) and torch.isnan(result["AP"]).all()


def test_soft_and_multi_hot_targets_threshold_at_one_half() -> None:
    probs, targets, _ = make_eval_set(seed=11)
    soft = targets * 0.6 + 0.08  # every row sums to 1; the true class holds 0.68, the others 0.08
    a = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    a.update(probs, targets)
    b = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    b.update(probs, soft)
    torch.testing.assert_close(a.compute()["AP"], b.compute()["AP"], equal_nan=True)


def test_metric_input_errors() -> None:
    metric = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    with pytest.raises(ValueError, match="must both be"):
        metric.update(torch.rand(4, 5), torch.rand(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((2, 6), float("nan")), torch.eye(6)[:2])
    with pytest.raises(ValueError, match="both session and frame"):
        metric.update(torch.rand(2, 6), torch.eye(6)[:2], session=torch.zeros(2, dtype=torch.long))
    metric.update(torch.rand(2, 6), torch.eye(6)[:2])
    with pytest.raises(ValueError, match="every update or on none"):
        metric.update(torch.rand(2, 6), torch.eye(6)[:2], torch.zeros(2), torch.arange(2))
    with pytest.raises(ValueError, match="outside"):
        FrameLevelMAP(num_classes=6, ambiguous_index=6)


def _ddp_worker(rank: int, world: int, init_file: str, chunks: list, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    probs, targets, _ = make_eval_set(seed=12)
    session, frame = torch.arange(600) // 100, torch.arange(600) % 100
    metric = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    for idx in chunks[rank]:
        idx = torch.as_tensor(idx)
        metric.update(probs[idx], targets[idx], session[idx], frame[idx])
    out = metric.compute()
    if rank == 0:
        queue.put({k: v.tolist() for k, v in out.items()})
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing torch: ~100 s on the shared 2-core machine
def test_two_process_gloo_equals_one_process(tmp_path) -> None:
    probs, targets, _ = make_eval_set(seed=12)
    single = FrameLevelMAP(num_classes=6, ambiguous_index=5)
    single.update(probs, targets)
    expected = single.compute()
    # Rank 0: 400 frames in 3 batches, rank 1: 200 frames + 1 repeated (padding sampler), 2 batches.
    chunks = [[list(range(0, 150)), list(range(150, 151)), list(range(151, 400))],
              [list(range(400, 600)), [400]]]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), chunks, queue), nprocs=2, start_method="spawn")
    got = queue.get(timeout=300)
    for key in ("AP", "cAP", "mAP", "mcAP"):
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64), expected[key],
                                   rtol=0, atol=1e-12, equal_nan=True)
