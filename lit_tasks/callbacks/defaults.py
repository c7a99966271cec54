"""The callbacks every `lit-tasks` run gets: checkpoints on the task's own metric and an LR monitor."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint


class TaskCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that, unless ``monitor`` is given, follows the task's ``monitor``/``mode`` class attributes.

    Keeps the best checkpoint (``best-epoch=..-step=...ckpt``) and ``last.ckpt``.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, filename: str = "best-{epoch:02d}-{step}",
                 save_top_k: int = 1, save_last: bool = True, auto_insert_metric_name: bool = True,
                 dirpath: str | None = None, every_n_epochs: int | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode or "min",
                         save_top_k=save_top_k, save_last=save_last, every_n_epochs=every_n_epochs,
                         auto_insert_metric_name=auto_insert_metric_name)
        self._mode_given = mode is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None and getattr(pl_module, "monitor", None):
            self.monitor = pl_module.monitor
            if not self._mode_given:
                self.mode = getattr(pl_module, "mode", "min")
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
        super().setup(trainer, pl_module, stage)


class LRMonitor(LearningRateMonitor):
    """LearningRateMonitor that stays silent instead of failing when the run has no logger."""

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
