"""The one loss reduction helper (lit_tasks/losses/reduction.py) that every loss and criterion uses."""

from __future__ import annotations

import pytest
import torch

import lit_tasks.losses.reduction as reduction
from lit_tasks.losses.reduction import loss_normaliser, reduce_loss


def test_reduce_loss() -> None:
    loss = torch.tensor([1.0, 2.0, 6.0])
    assert reduce_loss(loss, "none") is loss
    assert reduce_loss(loss, "sum").item() == 9.0 and reduce_loss(loss, "mean").item() == 3.0
    empty = torch.zeros(0, requires_grad=True)
    zero = reduce_loss(empty * 2, "mean")  # not NaN, and still on the graph
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="focal loss: reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        reduce_loss(loss, "avg", "focal loss")
    with pytest.raises(ValueError, match="^reduction must be"):
        reduce_loss(loss, "avg")


def test_loss_normaliser_is_the_process_mean_in_training_only(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(reduction, "reduce_mean", lambda v: calls.append(v.item()) or v.detach().float() * 0 + 0.5)
    count = torch.tensor(3, dtype=torch.int64)
    local = loss_normaliser(count, training=False, min_value=1.0)
    assert calls == [] and local.dtype == torch.float32 and local.item() == 3.0  # evaluation: no collective call
    assert loss_normaliser(count, training=True).item() == 0.5 and calls == [3.0]
    assert loss_normaliser(count, training=True, min_value=1.0).item() == 1.0  # clamped after the mean
    weights = torch.tensor([0.2, 0.3], requires_grad=True).sum()
    assert not loss_normaliser(weights, training=False).requires_grad
