"""BaseTask: the whole skeleton of every lit-tasks LightningModule; a task fills in the parts that differ.

Every task has the same names in the same places (DESIGN.md "One task dialect"):

- ``self.model`` (the network), ``self.criterion`` (the loss: the task's :meth:`~BaseTask.compute_losses` returns its
  WEIGHTED ``loss_*`` terms, plus anything else worth logging), ``self.metrics`` (an ``nn.ModuleDict`` keyed by stage,
  ``"val"`` / ``"test"``: a Metric, or a ModuleDict / ModuleList of them).
- Init: explicit, typed, defaulted arguments (LightningCLI reads the signature) and
  ``super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)``; :meth:`~BaseTask.argument_problems` lists what
  is wrong with them before anything is built, and BaseTask raises one ValueError prefixed with the class name. Then
  ``configure_models`` / ``configure_losses`` / ``configure_metrics`` build the parts.
- Hyperparameters are saved automatically (primitives only, so checkpoints reload with ``weights_only=True``), except
  the injected optimizer / scheduler and the names in ``eval_options``: evaluation-time settings (thresholds, test-time
  augmentation, pictures) that belong to a run, not to the trained model. They become attributes of the same name and
  are not in the checkpoint, so ``lit-tasks test --ckpt_path X`` takes them from the test's config and command line.
- Steps: ``training_step`` sums the ``loss_*`` terms (a non-finite total raises), logs ``train/loss`` and every term;
  ``validation_step`` / ``test_step`` call the task's one ``evaluation_step(batch, stage, dataloader_idx)``; the epoch
  ends log :meth:`~BaseTask.log_stage_metrics` and, on test, print :meth:`~BaseTask.test_table` on rank 0.
- Optimisation: ``default_optimizer`` and ``default_scheduler`` are the paper's recipe, used when no
  ``--model.optimizer`` / ``--model.lr_scheduler`` is injected. The parameter groups are the recipe's too, for
  either optimizer: ``param_group_rules`` (:class:`~lit_tasks.param_groups.ParamGroupRules`, mmcv's
  ``bias_lr_mult`` / ``bias_decay_mult`` / ``norm_decay_mult``; by default every parameter decays at one LR, as
  ``torch.optim.X(model.parameters())``). Groups carry ``lr_ratio`` / ``weight_decay_ratio`` (e.g. a 10x lower
  backbone LR for DETR, 2x the LR and no decay for mmdet's biases): the group's LR and weight decay are the
  optimizer's times those ratios. Step schedules share one vocabulary: ``lr_drop_epochs`` (a list of epochs) and
  ``lr_gamma``, turned into optimizer steps by :meth:`~BaseTask.steps_per_epoch`.
- Export (``tools/export.py``): the class attributes ``export_input_names``, ``export_output_names``,
  ``export_opset`` and the methods ``export_module()`` and ``export_example(batch_size=1, size=None)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor, nn
from torchmetrics import Metric

from lit_tasks.param_groups import ParamGroupRules, param_groups
from lit_tasks.run.lightning_seams import attached_trainer
from lit_tasks.schedules import warmup_cosine, warmup_multistep

NOT_SAVED = ("optimizer", "lr_scheduler")
STAGES = ("val", "test")
# Schedulers whose length is given in optimizer steps: an injected one steps every step unless told otherwise.
PER_STEP_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def loss_sum(losses: Mapping[str, Any]) -> Tensor:
    """The sum of the ``loss_*`` entries of a criterion's dict (the other entries are only logged)."""
    return sum(v for k, v in losses.items() if k.startswith("loss_"))


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor of a batch (a tensor, or nested tuples / lists / dicts of them), None if it has none."""
    if torch.is_tensor(batch):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


class BaseTask(LightningModule):
    """LightningModule skeleton: argument checks, hyperparameter saving, steps, epoch ends, optimisation, export.

    Subclasses set ``monitor``/``mode`` (the metric ModelCheckpoint follows), ``eval_options`` (init arguments that
    are evaluation-time settings, not saved), ``logged_metric_keys`` (the entries of a stage's metric logged at the
    epoch end; None = every scalar), ``param_rules`` (their recipe's parameter groups, cited) and the ``export_*``
    attributes, and implement the hooks ``configure_models``, ``compute_losses``, ``evaluation_step``, ``export_module``
    and ``export_example`` (and where they need them ``argument_problems``, ``configure_losses``,
    ``configure_metrics``, ``log_stage_metrics``, ``test_table``, ``default_optimizer``, ``default_scheduler``).

    Args:
        optimizer: injected optimizer callable; None = ``default_optimizer``.
        lr_scheduler: injected scheduler callable; None = ``default_scheduler`` (stepped every optimizer step).
        lr_scheduler_interval: when an injected scheduler steps, ``"step"`` or ``"epoch"``; None = per step
            for schedules whose length is in steps (OneCycleLR, CyclicLR), per epoch for the others.
    """

    monitor: str = "val/loss"
    mode: str = "min"
    eval_options: tuple[str, ...] = ()
    logged_metric_keys: tuple[str, ...] | None = None  # None: every scalar entry of the stage's metric
    param_rules: ParamGroupRules = ParamGroupRules()  # every parameter decays, one LR
    export_input_names: tuple[str, ...] = ("images",)
    export_output_names: tuple[str, ...] = ("output",)
    export_opset: int = 17

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__()
        # Walks up the __init__ frames, so the subclass's own arguments are collected too.
        frame = inspect.currentframe().f_back
        arguments: dict[str, Any] = {}
        for found in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            arguments.update(found)
        problems = self.argument_problems(arguments)
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.save_hyperparameters(ignore=[*NOT_SAVED, *self.eval_options], frame=frame)
        # Under LightningCLI the saved values are its config, which can hold a linked value the class does not take
        # (a DataModule's class_names for a task without that argument): such a key would make the checkpoint
        # unloadable (`--ckpt_path`, load_from_checkpoint), so only the class's own arguments are kept.
        accepted = set(inspect.signature(type(self).__init__).parameters) | {"_class_path", "_instantiator"}
        for name in [k for k in self.hparams if k not in accepted]:
            self.hparams.pop(name)
        for name in self.eval_options:
            setattr(self, name, arguments[name])
        self.epoch_results: dict[str, dict[str, Any]] = {}
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """What is wrong with the init arguments ``args`` (one message each, naming the option); empty when nothing.

        Called before anything is built; tasks extend it (``super().argument_problems(args) + [...]``). BaseTask checks
        the shared schedule option ``lr_drop_epochs``.
        """
        drops = args.get("lr_drop_epochs")
        if drops is not None and not isinstance(drops, (list, tuple)):  # e.g. action detection's former period
            return [f"lr_drop_epochs must be a list of epochs (e.g. [8, 11]), got {drops!r}"]
        if drops is not None and not (all(e >= 1 for e in drops) and list(drops) == sorted(set(drops))):
            return [f"lr_drop_epochs must be increasing epochs >= 1, got {drops}"]
        return []

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
        """Build the network ``self.model`` from ``self.hparams``."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Build ``self.criterion`` (where the task does not build it with the network)."""

    def configure_metrics(self) -> None:
        """Build ``self.metrics``: an ``nn.ModuleDict`` with the ``"val"`` and ``"test"`` metric."""

    # -- steps -----------------------------------------------------------------------------------
    def compute_losses(self, batch: Any, outputs: Any = None) -> dict[str, Tensor]:
        """The criterion's weighted ``loss_*`` terms (plus entries only logged) for ``batch``; ``outputs``: the
        network's outputs where the caller has them already (evaluation), else the network runs on ``batch``."""
        raise NotImplementedError

    def evaluation_step(self, batch: Any, stage: str, dataloader_idx: int = 0) -> Any:
        """Validation / test (``stage``): update ``self.metrics[stage]``, log ``{stage}/loss`` with :meth:`log_loss`
        where the task has one; returns what callbacks read (pictures, writers). Makes no collective call."""
        raise NotImplementedError

    def batch_size_of(self, batch: Any) -> int:
        """Samples in ``batch`` (the logged values' weight): the first dimension of its first tensor."""
        first = first_tensor(batch)
        if first is None:
            raise TypeError(f"{type(self).__name__}: no tensor in the batch to count its samples; "
                            "override batch_size_of")
        return int(first.shape[0])

    def total_loss(self, losses: Mapping[str, Tensor], stage: str) -> Tensor:
        """The sum of the ``loss_*`` terms; raises FloatingPointError naming the task, step and terms if non-finite."""
        loss = loss_sum(losses)
        if not torch.isfinite(loss):
            parts = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}
            raise FloatingPointError(f"{type(self).__name__}: non-finite {stage} loss {float(loss.detach())} at step "
                                     f"{self.global_step}: {parts}")
        return loss

    def log_loss(self, stage: str, losses: Mapping[str, Tensor], batch_size: int) -> Tensor:
        """Log the sum of the ``loss_*`` terms of ``losses`` as ``{stage}/loss`` (process-averaged); returns it."""
        loss = loss_sum(losses)
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        loss = self.total_loss(losses, "train")
        size = self.batch_size_of(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.evaluation_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self.evaluation_step(batch, "test", dataloader_idx)

    # -- epoch ends ------------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        self.log_stage_metrics("val")

    def on_test_epoch_end(self) -> None:
        values = self.log_stage_metrics("test")
        if self.trainer.is_global_zero:
            table = self.test_table(values)
            if table:
                print(table)

    def log_stage_metrics(self, stage: str) -> dict[str, Any]:
        """Compute, log (``logged_metric_keys``) and reset ``self.metrics[stage]``; returns its result."""
        return self.log_epoch_metric(self.metrics[stage], stage, self.logged_metric_keys)

    def test_table(self, values: dict[str, Any]) -> str:
        """The table printed after a test (rank 0) from :meth:`log_stage_metrics`'s result; empty: nothing printed."""
        return ""

    def log_metrics(self, values: dict[str, Any], prefix: str, batch_size: int | None = None) -> None:
        """Log scalar entries of ``values`` under ``prefix/``; non-scalars (per-class tables) are skipped."""
        scalars = {
            f"{prefix}/{k}": v.float() if torch.is_tensor(v) else v
            for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1
        }
        self.log_dict(scalars, sync_dist=False, batch_size=batch_size)

    def log_epoch_metric(self, metric: Metric | nn.ModuleDict, prefix: str,
                         keys: Sequence[str] | Mapping[str, str] | None = None) -> dict[str, Any]:
        """Compute ``metric`` (a collective under DDP: every rank calls it), reset it, log it, keep it.

        ``metric`` may be a ModuleDict of metrics: their results merge (a metric giving one value is kept under its
        key). Logs the scalar entries (only ``keys`` when given; a mapping also renames them) under ``prefix/`` and
        stores the whole result, detached on the CPU, in ``self.epoch_results[prefix]`` for callbacks (ROC curves,
        confusion matrices). Returns the result.
        """
        values: dict[str, Any] = {}
        for name, part in metric.items() if isinstance(metric, nn.ModuleDict) else [(None, metric)]:
            result = part.compute()
            part.reset()
            values.update(result if isinstance(result, dict) else {name: result})
        names = keys if isinstance(keys, Mapping) else {k: k for k in values if keys is None or k in keys}
        self.log_metrics({short: values[k] for k, short in names.items() if k in values}, prefix)
        self.epoch_results[prefix] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in values.items()}
        return values

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
        trainer = attached_trainer(self)
        return max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch of the attached Trainer (1 outside a Trainer, as ``total_steps``:
        the default optimizer can be built and inspected without one).

        Raises:
            ValueError: the training loader has no length (an iterable dataset without one), so epochs have none.
        """
        trainer = attached_trainer(self)
        if trainer is None:
            return 1
        if not math.isfinite(trainer.num_training_batches):
            trainer.fit_loop.setup_data()  # what estimated_stepping_batches does, unless max_steps is set
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ValueError(f"{type(self).__name__}: epoch milestones (lr_drop_epochs) need training epochs of known "
                             "length, a sized loader (an indexed or sized dataset); give an injected lr_scheduler in "
                             "steps instead")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def step_decay(self, optimizer: torch.optim.Optimizer, drop_epochs: Iterable[int], gamma: float,
                   warmup_start: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        """Per-step LambdaLR: the warm-up, then the LR x ``gamma`` at each of ``drop_epochs`` (epochs -> steps)."""
        per_epoch = self.steps_per_epoch()
        milestones = [int(epoch) * per_epoch for epoch in drop_epochs]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_multistep(self.warmup_steps(), milestones, gamma, warmup_start=warmup_start))

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

    # -- export (tools/export.py) ----------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """The inference network in eval mode: tensors in (``export_input_names``), a tensor or a tuple of tensors out
        (``export_output_names``), every one with the batch first."""
        raise NotImplementedError

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[Tensor, ...]:
        """Example inputs with ``batch_size`` samples; ``size`` ``(H, W)`` where the task's input size is free (a
        ValueError where the model fixes it)."""
        raise NotImplementedError

    def random_images(self, batch_size: int, size: Sequence[int] | None,
                      fixed: Sequence[int] | None = None) -> tuple[Tensor]:
        """``(batch_size, 3, H, W)`` uniform images in [0, 1] seeded by ``batch_size``, at ``size``; a model whose input
        size is ``fixed`` takes no ``size`` (ValueError)."""
        if fixed is not None and size is not None:
            raise ValueError(f"{type(self).__name__}'s input size is fixed by the model ({fixed[0]}x{fixed[1]}); "
                             "give no size")
        h, w = fixed if fixed is not None else size
        generator = torch.Generator().manual_seed(batch_size)
        return (torch.rand(batch_size, 3, int(h), int(w), generator=generator),)
