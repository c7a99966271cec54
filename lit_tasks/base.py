"""BaseTask: the shared skeleton of every lit-tasks LightningModule.

A task subclass declares explicit, typed, defaulted ``__init__`` arguments (LightningCLI reads the
signature), calls ``super().__init__()`` and implements ``configure_models``, ``configure_losses`` and
``configure_metrics``. Hyperparameters are saved automatically (primitives only, so checkpoints reload
with ``weights_only=True``); the optimizer and scheduler are injected callables and never saved.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

NOT_SAVED = ("optimizer", "lr_scheduler")


class BaseTask(LightningModule):
    """LightningModule with hyperparameter saving, optimizer/scheduler injection and metric wiring.

    Subclasses set ``monitor``/``mode`` (the metric ModelCheckpoint follows) and override
    ``default_optimizer`` for the recipe of their paper. ``optimizer=None`` means that default;
    ``lr_scheduler=None`` means linear warm-up over ``warmup_steps`` then cosine decay to 0 over
    ``trainer.estimated_stepping_batches``, stepped every optimizer step.
    """

    monitor: str = "val/loss"
    mode: str = "min"

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # Walks up the __init__ frames, so the subclass's own arguments are collected too.
        self.save_hyperparameters(ignore=list(NOT_SAVED))
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # -- parts a task builds -------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the networks from ``self.hparams``."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Build loss modules (kept separate so a subclass can swap them)."""

    def configure_metrics(self) -> None:
        """Build torchmetrics objects for ``val/`` and ``test/``."""

    # -- optimisation ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: no weight decay on biases and norm weights."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """The paper recipe's optimizer; tasks override. Used when ``optimizer`` is None."""
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    def warmup_steps(self) -> int:
        """Linear warm-up length of the default scheduler (tasks read it from their hparams)."""
        return int(self.hparams.get("warmup_steps", 0))

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        optimizer = self.optimizer(groups) if self.optimizer is not None else self.default_optimizer(groups)
        if self.lr_scheduler is not None:
            scheduler = self.lr_scheduler(optimizer)
            interval = "epoch"
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, warmup_cosine(self.warmup_steps(), total)
            )
            interval = "step"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": self.monitor},
        }

    # -- helpers shared by the tasks ------------------------------------------------------------
    def log_metrics(self, values: dict[str, torch.Tensor], prefix: str, batch_size: int | None = None) -> None:
        """Log scalar entries of ``values`` under ``prefix/``; non-scalars (per-class tables) are skipped."""
        scalars = {
            f"{prefix}/{k}": v for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1
        }
        self.log_dict(scalars, sync_dist=False, batch_size=batch_size)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 1/warmup to 1, then half-cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))

    return factor
