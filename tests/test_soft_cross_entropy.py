"""Soft-target cross entropy without the ambiguous class and OadTR's criterion, against a NumPy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_tasks.losses.soft_cross_entropy import OadTRCriterion, soft_cross_entropy, valid_rows


def numpy_soft_ce(logits: np.ndarray, targets: np.ndarray, ignore: int | None) -> np.ndarray:
    """-sum_c y_c log softmax(z)_c over the columns other than ``ignore`` (float64 log-sum-exp)."""
    cols = [c for c in range(logits.shape[-1]) if c != ignore]
    z, y = logits[..., cols].astype(np.float64), targets[..., cols].astype(np.float64)
    m = z.max(-1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    return -(y * log_p).sum(-1)


def make_batch(b: int = 16, q: int = 3, c: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cur_cls = torch.randint(0, c, (b,), generator=g)
    ant_cls = torch.randint(0, c, (b, q), generator=g)
    cur_cls[:3] = c - 1  # some ambiguous current frames
    cur_t = torch.nn.functional.one_hot(cur_cls, c).float()
    ant_t = torch.nn.functional.one_hot(ant_cls, c).float()
    ant_t[-1, 1:] = 0.0  # anticipated frames past the end of the video: unlabelled
    return torch.randn(b, c, generator=g) * 3, torch.randn(b, q, c, generator=g) * 3, cur_t, ant_t


def test_soft_cross_entropy_equals_formula() -> None:
    logits, _, targets, _ = make_batch()
    got = soft_cross_entropy(logits, targets, ignore_index=5)
    ref = numpy_soft_ce(logits.numpy(), targets.numpy(), 5)
    ref[targets[:, 5].numpy() == 1] = 0.0  # ambiguous rows excluded
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    ambiguous = targets[:, 5] == 1
    assert ambiguous[:3].all() and (got[ambiguous] == 0).all() and (got[~ambiguous] > 0).all()
    # The ambiguous logit plays no part: changing it changes nothing.
    moved = logits.clone()
    moved[:, 5] += 100.0
    torch.testing.assert_close(soft_cross_entropy(moved, targets, 5), got)
    # Without ignore_index: a plain soft cross entropy over all C columns, equal to F.cross_entropy.
    full = soft_cross_entropy(logits, targets)
    torch.testing.assert_close(full, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))


def test_soft_and_multi_hot_targets() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, 6, generator=g)
    targets = torch.rand(8, 4, 6, generator=g)
    targets[..., 5] = 0.2  # soft ambiguous mass below 1/2: not an ambiguous row
    got = soft_cross_entropy(logits, targets, ignore_index=5)
    ref = numpy_soft_ce(logits.numpy(), targets.numpy(), 5)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_extreme_logits_and_bf16_stay_finite_in_fp32() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4], [-3e4, 3e4, 1e4, 0.0]])
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    got = soft_cross_entropy(logits, targets, ignore_index=3)
    np.testing.assert_allclose(got.numpy(), numpy_soft_ce(logits.numpy(), targets.numpy(), 3), rtol=1e-6)
    assert got.tolist() == [2e4, 6e4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = soft_cross_entropy(logits.bfloat16(), targets, ignore_index=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_valid_rows() -> None:
    t = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0], [0.5, 0, 0.5], [0, 0.6, 0.4]])
    assert valid_rows(t, ignore_index=2).tolist() == [True, False, False, False, True]
    assert valid_rows(t).tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("training", [True, False])
def test_criterion_weights_and_means(training: bool) -> None:
    cur, ant, cur_t, ant_t = make_batch(seed=2)
    crit = OadTRCriterion(ambiguous_index=5).train(training)
    out = crit(cur, ant, cur_t, ant_t)
    ce_cur = numpy_soft_ce(cur.numpy(), cur_t.numpy(), 5)
    keep_cur = cur_t[:, 5].numpy() == 0
    ce_ant = numpy_soft_ce(ant.numpy(), ant_t.numpy(), 5).reshape(-1)
    flat = ant_t.reshape(-1, 6).numpy()
    keep_ant = (flat[:, 5] == 0) & (flat.sum(1) > 0)
    assert keep_ant.sum() < len(keep_ant)  # the test batch has rows to drop
    assert out["loss_current"].item() == pytest.approx(1.0 * ce_cur[keep_cur].mean(), rel=1e-6)
    assert out["loss_anticipation"].item() == pytest.approx(0.5 * ce_ant[keep_ant].mean(), rel=1e-6)
    custom = OadTRCriterion(ambiguous_index=5, current_weight=2.0, anticipation_weight=0.0)(cur, ant, cur_t, ant_t)
    assert custom["loss_current"].item() == pytest.approx(2 * out["loss_current"].item(), rel=1e-6)
    assert custom["loss_anticipation"].item() == 0.0


def test_criterion_all_ambiguous_is_zero_and_connected() -> None:
    cur = torch.randn(4, 6, requires_grad=True)
    ant = torch.randn(4, 2, 6, requires_grad=True)
    cur_t = torch.zeros(4, 6)
    cur_t[:, 5] = 1.0
    ant_t = torch.zeros(4, 2, 6)  # unlabelled
    out = OadTRCriterion(ambiguous_index=5)(cur, ant, cur_t, ant_t)
    assert out["loss_current"].item() == 0.0 and out["loss_anticipation"].item() == 0.0
    (out["loss_current"] + out["loss_anticipation"]).backward()
    assert cur.grad is not None and (cur.grad == 0).all() and (ant.grad == 0).all()


def test_criterion_shape_errors() -> None:
    crit = OadTRCriterion(ambiguous_index=5)
    with pytest.raises(ValueError, match=r"must be \(B, Q, C\)"):
        crit(torch.randn(4, 6), torch.randn(4, 6), torch.zeros(4, 6), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(torch.randn(4, 6), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="outside"):
        soft_cross_entropy(torch.randn(4, 6), torch.zeros(4, 6), ignore_index=6)
