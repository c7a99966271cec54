"""How every loss here is reduced: elementwise ``"none"`` / ``"mean"`` / ``"sum"``, and the normaliser of a summed loss.

A detection loss is a sum over positives (locations, matched queries, valid frames) divided by their number. Under
DDP each process holds part of the batch, so the divisor is the number averaged over processes: DDP's gradient
average then gives the loss of the union of every process's batch, each positive weighed alike whatever process it
fell on (mmdet's ``reduce_mean(num_pos)``, detr's ``all_reduce(num_boxes) / world_size``). Every process makes the
collective call, whatever its data; evaluation makes none (its loaders may split samples unevenly).
"""

from __future__ import annotations

from torch import Tensor

from lit_tasks.ops.distributed import reduce_mean

def reduce_loss(loss: Tensor, reduction: str, what: str = "") -> Tensor:
    """``loss`` as it is (``"none"``), summed, or averaged (an empty mean is a graph-connected 0, not NaN).

    ``what`` prefixes the error for an unknown ``reduction`` (e.g. ``"focal loss"``).
    """
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum() * 0.0
    prefix = f"{what}: " if what else ""
    raise ValueError(f"{prefix}reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def loss_normaliser(value: Tensor, *, training: bool, min_value: float | None = None) -> Tensor:
    """The divisor of a summed loss (e.g. the number of positives), detached float32, clamped at ``min_value``.

    In training the mean of ``value`` over processes (one all-reduce; every process must call it, with the same
    shape); in evaluation the local value (no collective call).
    """
    value = reduce_mean(value) if training else value.detach().float()
    return value if min_value is None else value.clamp(min=min_value)
