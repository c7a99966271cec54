"""BaseTask: the shared skeleton of every lit-tasks LightningModule.

A task subclass declares explicit, typed, defaulted ``__init__`` arguments (LightningCLI reads the
signature), calls ``super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)`` and implements
``configure_models`` (and, where it has them, ``configure_losses`` / ``configure_metrics``).

- Hyperparameters are saved automatically (primitives only, so checkpoints reload with
  ``weights_only=True``), except the injected optimizer / scheduler and the names in ``eval_options``:
  evaluation-time settings (thresholds, test-time augmentation, pictures) that belong to a run, not to
  the trained model. They become attributes of the same name and are not in the checkpoint, so
  ``lit-tasks test --ckpt_path X`` takes them from the test's config and command line.
- Optimisation: ``default_optimizer`` and ``default_scheduler`` are the paper's recipe, used when no
  ``--model.optimizer`` / ``--model.lr_scheduler`` is injected. The parameter groups are the recipe's too, for
  either optimizer: ``param_group_rules`` (:class:`~lit_tasks.param_groups.ParamGroupRules`, mmcv's
  ``bias_lr_mult`` / ``bias_decay_mult`` / ``norm_decay_mult``; by default every parameter decays at one LR, as
  ``torch.optim.X(model.parameters())``). Groups carry ``lr_ratio`` / ``weight_decay_ratio`` (e.g. a 10x lower
  backbone LR for DETR, 2x the LR and no decay for mmdet's biases): the group's LR and weight decay are the
  optimizer's times those ratios.
- ``log_epoch_metric`` computes, resets and logs a torchmetrics result at an epoch end and keeps it in
  ``epoch_results[stage]`` for callbacks (ROC curves, confusion matrices).
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Literal, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torchmetrics import Metric

from lit_tasks.param_groups import ParamGroupRules, param_groups
from lit_tasks.schedules import warmup_cosine

NOT_SAVED = ("optimizer", "lr_scheduler")
# Schedulers whose length is given in optimizer steps: an injected one steps every step unless told otherwise.
PER_STEP_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


class BaseTask(LightningModule):
    """LightningModule with hyperparameter saving, optimizer/scheduler injection and metric wiring.

    Subclasses set ``monitor``/``mode`` (the metric ModelCheckpoint follows), ``eval_options`` (init
    arguments that are evaluation-time settings, not saved), ``param_rules`` (their recipe's parameter groups,
    cited) and override ``default_optimizer`` / ``default_scheduler`` for the recipe of their paper.

    Args:
        optimizer: injected optimizer callable; None = ``default_optimizer``.
        lr_scheduler: injected scheduler callable; None = ``default_scheduler`` (stepped every optimizer step).
        lr_scheduler_interval: when an injected scheduler steps, ``"step"`` or ``"epoch"``; None = per step
            for schedules whose length is in steps (OneCycleLR, CyclicLR), per epoch for the others.
    """

    monitor: str = "val/loss"
    mode: str = "min"
    eval_options: tuple[str, ...] = ()
    param_rules: ParamGroupRules = ParamGroupRules()  # every parameter decays, one LR

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # Walks up the __init__ frames, so the subclass's own arguments are collected too.
        frame = inspect.currentframe().f_back
        self.save_hyperparameters(ignore=[*NOT_SAVED, *self.eval_options], frame=frame)
        # Under LightningCLI the saved values are its config, which can hold a linked value the class does not take
        # (a DataModule's class_names for a task without that argument): such a key would make the checkpoint
        # unloadable (`--ckpt_path`, load_from_checkpoint), so only the class's own arguments are kept.
        accepted = set(inspect.signature(type(self).__init__).parameters) | {"_class_path", "_instantiator"}
        for name in [k for k in self.hparams if k not in accepted]:
            self.hparams.pop(name)
        arguments: dict[str, Any] = {}
        for found in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            arguments.update(found)
        for name in self.eval_options:
            setattr(self, name, arguments[name])
        self.epoch_results: dict[str, dict[str, torch.Tensor]] = {}
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint holds the weights ``pretrained_weights`` gave (the published file a task started from): it
        names no file, so loading it (``--ckpt_path``, ``load_from_checkpoint``) needs none; the options the file set
        are in the hyperparameters already (``lit_tasks.models.published.apply_options``)."""
        hp = checkpoint.get("hyper_parameters")
        if hp and hp.get("pretrained_weights"):
            reset = {k: v for k, v in (("pretrained_weights", None), ("pretrained_class_rows", None),
                                       ("reinit_class_head", False)) if k in hp}
            checkpoint["hyper_parameters"] = {**hp, **reset}
            checkpoint["pretrained_weights_file"] = hp["pretrained_weights"]  # where the start came from

    # -- parts a task builds -------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build the networks from ``self.hparams`` (the network is ``self.model`` in every task)."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Build loss modules (kept separate so a subclass can swap them)."""

    def configure_metrics(self) -> None:
        """Build torchmetrics objects for ``val/`` and ``test/``."""

    # -- optimisation ----------------------------------------------------------------------------
    def param_group_rules(self) -> ParamGroupRules:
        """The recipe's parameter-group rules (``param_rules``; a task whose recipe depends on an option overrides)."""
        return self.param_rules

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: the trainable parameters under :meth:`param_group_rules`."""
        return param_groups(self, self.param_group_rules())

    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """The paper recipe's optimizer; tasks override. Used when ``optimizer`` is None."""
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    def default_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The recipe's schedule over ``total_steps`` optimizer steps (stepped per step): warm-up + cosine."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps(), total_steps))

    def warmup_steps(self) -> int:
        """Linear warm-up length of the default scheduler (tasks read it from their hparams)."""
        return int(self.hparams.get("warmup_steps", 0))

    def total_steps(self) -> int:
        """Optimizer steps of the whole fit (1 outside a Trainer)."""
        return max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.param_groups()) if self.optimizer is not None else self.default_optimizer(
            self.param_groups())
        for group in optimizer.param_groups:  # before any scheduler records the groups' initial LRs
            group["lr"] *= group.get("lr_ratio", 1.0)
            if "weight_decay" in group:
                group["weight_decay"] *= group.get("weight_decay_ratio", 1.0)
        if self.lr_scheduler is not None:
            scheduler = self.lr_scheduler(optimizer)
            interval = self.hparams.get("lr_scheduler_interval") or (
                "step" if isinstance(scheduler, PER_STEP_SCHEDULERS) else "epoch")
        else:
            scheduler, interval = self.default_scheduler(optimizer, self.total_steps()), "step"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": self.monitor},
        }

    # -- logging -----------------------------------------------------------------------------------
    def log_metrics(self, values: dict[str, torch.Tensor], prefix: str, batch_size: int | None = None) -> None:
        """Log scalar entries of ``values`` under ``prefix/``; non-scalars (per-class tables) are skipped."""
        scalars = {
            f"{prefix}/{k}": v.float() if torch.is_tensor(v) else v
            for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1
        }
        self.log_dict(scalars, sync_dist=False, batch_size=batch_size)

    def log_epoch_metric(self, metric: Metric, stage: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Compute ``metric`` (a collective under DDP: every rank calls it), reset it, log it, keep it.

        Logs the scalar entries (only ``keys`` when given) under ``stage/`` and stores the whole result,
        detached on the CPU, in ``self.epoch_results[stage]`` for callbacks. Returns the result.
        """
        values = metric.compute()
        metric.reset()
        self.log_metrics({k: v for k, v in values.items() if keys is None or k in keys}, stage)
        self.epoch_results[stage] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in values.items()}
        return values
