"""Where the picture callbacks draw: the run's TensorBoard SummaryWriter."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def tensorboard(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            return experiment
    return None
