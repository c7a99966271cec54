"""Verification metric: exact parity with a NumPy + sklearn KFold re-implementation of insightface's protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import interp1d
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from lit_tasks.metrics.verification import (
    VerificationMetric,
    best_threshold_accuracy,
    kfold_slices,
    slinear_interp,
    tar_at_far,
    verification_report,
)


# -- the reference: insightface eval/verification.py, written out plainly ----------------------
def ref_accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> float:
    pred = np.less(dist, threshold)
    tp = np.sum(np.logical_and(pred, same))
    tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
    return float(tp + tn) / dist.size


def ref_roc(dist: np.ndarray, same: np.ndarray, n_folds: int = 10):
    thresholds = np.arange(0, 4, 0.01)
    accuracy, best = np.zeros(n_folds), np.zeros(n_folds)
    for k, (train, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist)))):
        acc_train = np.array([ref_accuracy(t, dist[train], same[train]) for t in thresholds])
        i = np.argmax(acc_train)
        accuracy[k], best[k] = ref_accuracy(thresholds[i], dist[test], same[test]), thresholds[i]
    return accuracy, best


def ref_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """Degree-1 spline through sorted x with repeats, written out: last point of the run at or below x_new."""
    i = int(np.searchsorted(x, x_new, side="right")) - 1
    if i >= len(x) - 1:
        return float(y[int(np.searchsorted(x, x[-1], side="left"))])
    return float(y[i] + (y[i + 1] - y[i]) * (x_new - x[i]) / (x[i + 1] - x[i]))


def ref_val(dist: np.ndarray, same: np.ndarray, far_target: float, n_folds: int = 10):
    thresholds = np.arange(0, 4, 0.001)

    def val_far(t, d, s):
        accept = np.less(d, t)
        return float(np.sum(accept & s)) / float(np.sum(s)), float(np.sum(accept & ~s)) / float(np.sum(~s))

    vals, fars = [], []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(dist))):
        far_train = np.array([val_far(t, dist[train], same[train])[1] for t in thresholds])
        threshold = ref_slinear(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        v, f = val_far(threshold, dist[test], same[test])
        vals.append(v)
        fars.append(f)
    return np.mean(vals), np.std(vals), np.mean(fars)


def synthetic_pairs(n: int, seed: int, separation: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Distances in [0, 4]: same pairs around 1.0, different ones around 1.0 + separation, noisy."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    dist = np.clip(rng.normal(1.0 + separation * ~same, 0.35), 0, 4)
    return dist, same


@pytest.mark.parametrize("n,seed", [(600, 0), (257, 1), (1000, 2)])
def test_fold_accuracy_and_thresholds_equal_reference_exactly(n: int, seed: int) -> None:
    dist, same = synthetic_pairs(n, seed)
    ours = best_threshold_accuracy(dist, same)
    acc, thr = ref_roc(dist, same)
    assert np.array_equal(ours["fold_accuracy"], acc)
    assert np.array_equal(ours["threshold"], thr)
    report = verification_report(dist, same)
    assert report["verification_accuracy"].item() == np.mean(acc)
    assert report["verification_accuracy_std"].item() == np.std(acc)


def test_kfold_slices_equal_sklearn() -> None:
    for n in (10, 11, 19, 600, 6001):
        ours = [list(range(s.start, s.stop)) for s in kfold_slices(n, 10)]
        theirs = [list(test) for _, test in KFold(10).split(np.arange(n))]
        assert ours == theirs


def test_ties_choose_the_smallest_threshold() -> None:
    # Every pair is separated by any threshold in (0.5, 1.5]: the first such grid value must win.
    dist = np.array([0.5, 1.5] * 10)
    same = np.array([True, False] * 10)
    out = best_threshold_accuracy(dist, same)
    assert np.allclose(out["threshold"], 0.51) and np.all(out["fold_accuracy"] == 1.0)


@pytest.mark.parametrize("far", [1e-2, 1e-3])
def test_tar_at_far_equals_reference(far: float) -> None:
    dist, same = synthetic_pairs(600, 3, separation=1.2)
    ours = tar_at_far(dist, same, far)
    ref = ref_val(dist, same, far)
    assert ours[0] == pytest.approx(ref[0], abs=1e-12)
    assert ours[1] == pytest.approx(ref[1], abs=1e-12)
    assert ours[2] == pytest.approx(ref[2], abs=1e-12)


def test_slinear_matches_scipy_and_old_scipy_with_repeats() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(rng.random(50))
    y = np.sort(rng.random(50))
    for q in rng.uniform(x[0], x[-1], 20):  # distinct x: today's scipy agrees
        assert slinear_interp(x, y, q) == pytest.approx(float(interp1d(x, y, kind="slinear")(q)), abs=1e-14)
    for _ in range(200):  # repeated x (what FAR looks like): the pre-1.9 scipy spline
        x = np.sort(rng.integers(0, 10, 30) / 10.0)
        if x[0] == x[-1]:
            continue
        x = np.unique(x) if rng.random() < 0.1 else x
        y = np.sort(rng.random(len(x)))
        for q in rng.uniform(x[0], x[-1], 5):
            assert slinear_interp(x, y, q) == pytest.approx(ref_slinear(x, y, q), abs=1e-12)


def test_perfect_embeddings_score_one_and_shuffled_labels_score_half() -> None:
    g = torch.Generator().manual_seed(0)
    identities = torch.nn.functional.normalize(torch.randn(100, 64, generator=g), dim=1)
    n = 2000
    ia = torch.randint(0, 100, (n,), generator=g)
    same = torch.arange(n) % 2 == 0
    ib = torch.where(same, ia, (ia + torch.randint(1, 100, (n,), generator=g)) % 100)
    # Same pairs at distance < 1e-4, different ones > 0.5: separable at every fold's threshold.
    a = identities[ia] + 1e-3 * torch.randn(n, 64, generator=g)
    b = identities[ib] + 1e-3 * torch.randn(n, 64, generator=g)
    metric = VerificationMetric()
    metric.update(a, b, same, torch.arange(n))
    out = metric.compute()
    assert out["verification_accuracy"].item() == 1.0 and out["auc"].item() == 1.0
    assert out["tar_at_far_1e-3"].item() == pytest.approx(1.0, abs=0.01)
    shuffled = VerificationMetric()
    shuffled.update(a, b, same[torch.randperm(n, generator=g)], torch.arange(n))
    res = shuffled.compute()
    assert abs(res["verification_accuracy"].item() - 0.5) < 0.05
    assert abs(res["auc"].item() - 0.5) < 0.05


def test_metric_auc_and_order_independence() -> None:
    g = torch.Generator().manual_seed(1)
    n = 500
    a, b = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    same = torch.rand(n, generator=g) < 0.5
    b[same] = a[same] + 0.8 * torch.randn(int(same.sum()), 16, generator=g)
    in_order = VerificationMetric()
    in_order.update(a, b, same, torch.arange(n))
    expected = in_order.compute()
    # As a DistributedSampler would deliver them: interleaved, in several batches, the first pairs
    # repeated to pad the last batch. Index order and de-duplication must restore the same result.
    perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2), torch.arange(3)])
    scrambled = VerificationMetric()
    for chunk in perm.split(64):
        scrambled.update(a[chunk], b[chunk], same[chunk], chunk)
    got = scrambled.compute()
    for key in ("verification_accuracy", "verification_accuracy_std", "auc", "tar_at_far_1e-2", "fold_threshold"):
        assert torch.equal(got[key], expected[key]), key
    an, bn = torch.nn.functional.normalize(a.double()), torch.nn.functional.normalize(b.double())
    dist = ((an - bn) ** 2).sum(1).numpy()
    assert expected["auc"].item() == pytest.approx(roc_auc_score(same.numpy(), -dist), abs=1e-9)


def test_few_pairs_warn_and_use_fewer_folds() -> None:
    metric = VerificationMetric()
    metric.update(torch.randn(6, 4), torch.randn(6, 4), torch.tensor([1, 0, 1, 0, 1, 0]).bool(), torch.arange(6))
    with pytest.warns(UserWarning, match="only 6 verification pairs"):
        out = metric.compute()
    assert out["fold_accuracy"].shape == (6,)


def _update_on_some_ranks(rank: int, world: int, out_dir: str) -> None:
    """Rank 0 sees every pair of a 21-pair set, rank 1 none (an evaluation loader giving each pair to one process
    can leave a process without any pair of a small set); both compute, as Lightning's epoch end does."""
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(21, 8, generator=generator), torch.randn(21, 8, generator=generator)
    same = torch.arange(21) % 2 == 0
    metric = VerificationMetric()
    if rank == 0:
        metric.update(a[:15], b[:15], same[:15], torch.arange(15))
        metric.update(a[15:], b[15:], same[15:], torch.arange(15, 21))
    result = metric.compute()
    empty = VerificationMetric()  # a set no process saw: NaN, without a hang or a dtype error
    with pytest.warns(UserWarning):
        nothing = empty.compute()
    torch.save({"result": result, "nothing": nothing}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()


@pytest.mark.slow
def test_a_process_without_pairs_still_syncs(tmp_path) -> None:
    from ddp_helpers import run_processes

    run_processes(_update_on_some_ranks, str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(21, 8, generator=generator), torch.randn(21, 8, generator=generator)
    single = VerificationMetric()
    single.update(a, b, torch.arange(21) % 2 == 0, torch.arange(21))
    expected = single.compute()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("verification_accuracy", "auc", "tar_at_far_1e-3", "fold_accuracy"):
            assert torch.equal(out["result"][key], expected[key]), (rank, key)
        assert torch.isnan(out["nothing"]["verification_accuracy"])
