"""Learning-rate schedules of the recipes, as multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Each factory returns ``factor(step) -> float`` with ``step`` counted in optimizer steps (the tasks step
their default schedules every optimizer step). All start with an optional linear warm-up over ``warmup_steps``:
from ``1 / warmup_steps`` to 1 (``(step + 1) / warmup_steps``), or, given ``warmup_start``, mmcv's linear warm-up
from that fraction (``warmup_ratio``): ``start + (1 - start) * step / warmup_steps`` (mmcv ``LrUpdaterHook``
``warmup='linear'``; mmengine ``LinearLR(start_factor)`` alike).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

Schedule = Callable[[int], float]


def _warmup(step: int, warmup_steps: int, start: float | None = None) -> float | None:
    """The warm-up factor while ``step < warmup_steps``, else None (see the module docstring for ``start``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps if start is None else start + (1.0 - start) * step / warmup_steps
    return None


def warmup_cosine(warmup_steps: int, total_steps: int, warmup_start: float | None = None) -> Schedule:
    """Linear warm-up, then half-cosine from 1 to 0 at ``total_steps`` (SGDR without restarts)."""

    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps, warmup_start)
        if warm is not None:
            return warm
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))

    return factor


def warmup_poly(warmup_steps: int, total_steps: int, power: float = 0.9) -> Schedule:
    """Linear warm-up, then DeepLab's "poly" policy ``(1 - progress)^power`` down to 0 (DeepLabV3 §4.1)."""

    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - min(1.0, progress)) ** power

    return factor


def warmup_multistep(warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1,
                     warmup_start: float | None = None) -> Schedule:
    """Linear warm-up, then the LR times ``gamma`` at each of ``milestones`` (steps; mmdet's "step" policy)."""
    marks = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps, warmup_start)
        if warm is not None:
            return warm
        return gamma ** sum(step >= m for m in marks)

    return factor
