"""The callbacks every `lit-tasks` run gets: checkpoints on the task's own metric and an LR monitor."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_tasks.run import lightning_seams as seams


class TaskCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that follows the task's ``monitor``/``mode`` and keeps ``last.ckpt`` truly last.

    Keeps the best checkpoint (``best-epoch=..-step=...ckpt``) on the task's metric, and ``last.ckpt``, which
    holds the state of the latest of these moments (Lightning alone refreshes it only when a best checkpoint
    is written, and never at the end of a run that stops between validations):

    * every validation (and every epoch end when there is no validation);
    * every ``every_n_train_steps`` optimizer steps, so a killed run loses at most that many steps
      (``last.ckpt`` only: best checkpoints still follow validations);
    * the end of ``fit``, whatever ended it: ``max_steps``, ``max_epochs``, ``max_time``, early stopping. A fit that
      stops in the middle of an epoch (``max_time``'s Timer or another callback setting ``trainer.should_stop``,
      ``max_steps``) keeps in ``last.ckpt`` the state of the step boundary where it stopped, as a periodic checkpoint
      there would hold it, and not the state after the epoch-end hooks Lightning then runs (which count the cut epoch
      as finished, so ``fit --ckpt_path last`` would skip the rest of it, or end at once when it was the last) nor
      after the validation Lightning runs at a stop (it draws from the random generators): the resumed fit trains
      the rest of the epoch as a fit that never stopped would;
    * an interruption: the first Ctrl-C (SIGINT) stops the run at the end of the current step and saves
      (every process of a multi-process run stops at the same step); a second Ctrl-C stops at once and
      saves only if the interruption came at a step boundary (in one process). A ``KeyboardInterrupt`` or
      Lightning's SIGTERM stop raised at a step boundary saves too (one process).

    Files are written through the trainer's checkpoint IO (``lit-tasks`` installs
    :class:`~lit_tasks.run.checkpoint_io.AtomicCheckpointIO`: a kill while writing leaves the previous file).

    Args:
        monitor, mode: the metric and direction of the best checkpoint; None = the task's class attributes.
        filename, save_top_k, auto_insert_metric_name, dirpath, every_n_epochs: as ``ModelCheckpoint``.
        save_last: keep ``last.ckpt`` as described above.
        every_n_train_steps: also write ``last.ckpt`` every this many optimizer steps (None or 0: only at the
            moments above). Needed for a mid-epoch resume after a kill (``fit --ckpt_path last``).
        stop_on_interrupt: handle Ctrl-C as above during ``fit`` (installs a SIGINT handler in the main thread; in a
            multi-process run the processes agree after every step whether to stop, with one tiny all-reduce).
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, filename: str = "best-{epoch:02d}-{step}",
                 save_top_k: int = 1, save_last: bool = True, auto_insert_metric_name: bool = True,
                 dirpath: str | None = None, every_n_epochs: int | None = None, every_n_train_steps: int | None = None,
                 stop_on_interrupt: bool = True) -> None:
        seams.check_model_checkpoint_seams()
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode or "min",
                         save_top_k=save_top_k, save_last=save_last, every_n_epochs=every_n_epochs,
                         auto_insert_metric_name=auto_insert_metric_name)
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self._mode_given = mode is not None
        self.last_every_n_train_steps = every_n_train_steps or 0
        self.stop_on_interrupt = stop_on_interrupt
        self._step_in_last = -1  # global step whose state last.ckpt holds (-1: none written by this run yet)
        self._interrupt_requested = False
        self._interrupt_at_boundary = False
        self._stop_after_save = False
        self._held_step = -1  # a fit stopped mid-epoch: the step whose boundary state last.ckpt keeps to the end
        self._hold_after_validation = False  # ... once the scheduled validation of that step is done
        self._previous_sigint: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None and getattr(pl_module, "monitor", None):
            self.monitor = pl_module.monitor
            if not self._mode_given:
                self.mode = getattr(pl_module, "mode", "min")
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
        super().setup(trainer, pl_module, stage)

    # -- when last.ckpt is written -----------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_in_last = trainer.global_step  # a resumed run starts from a saved state: nothing new to write
        self._interrupt_requested = self._interrupt_at_boundary = self._stop_after_save = False
        self._held_step, self._hold_after_validation = -1, False
        self._install_sigint_handler()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # A validation due after this step saves last.ckpt once it is done: a checkpoint written before it would make
        # Lightning skip that validation on resume (it fast-forwards the validation of a batch-end checkpoint).
        step_end = step_end_outlook(trainer)
        validation_follows = step_end.validates
        if step_end.stops_mid_epoch and self.save_last and self._may_write(trainer):
            self._keep_stop_boundary(trainer, step_end)
        n = self.last_every_n_train_steps
        if n and trainer.global_step % n == 0 and not validation_follows:
            self._refresh_last(trainer)
        if self.stop_on_interrupt and self._may_write(trainer):
            requested = self._interrupt_requested
            if trainer.world_size > 1:  # every process stops at the same step (a process without the handler too)
                requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            if requested and validation_follows:
                self._stop_after_save = True  # after the validation and its last.ckpt
            elif requested:
                self._stop_at_boundary(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if seams.saves_at_train_epoch_end(self, trainer):
            self._refresh_last(trainer)
            if self._stop_after_save:
                self._stop_at_boundary(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        after_stop = self._hold_after_validation and not trainer.sanity_checking
        if after_stop or not seams.saves_at_train_epoch_end(self, trainer):
            self._refresh_last(trainer)
            if after_stop:
                self._held_step, self._hold_after_validation = trainer.global_step, False
            if self._stop_after_save:
                self._stop_at_boundary(trainer)

    def _keep_stop_boundary(self, trainer: pl.Trainer, step_end: "StepEnd") -> None:
        """The fit stops after this step inside its epoch: write last.ckpt at this boundary (after the step's
        scheduled validation, if one is due, as a periodic save does) and keep it for the rest of the fit."""
        if step_end.between_micro_batches:
            rank_zero_warn(f"the fit stops after batch {trainer.fit_loop.epoch_loop.batch_idx + 1} of the epoch, "
                           "between the micro-batches of an accumulated step: a fit resumed from last.ckpt continues "
                           "the epoch, but the gradients accumulated since the last optimizer step are not in it")
        if step_end.validates:
            self._hold_after_validation = True
            return
        self._refresh_last(trainer)
        self._held_step = trainer.global_step

    def _stop_at_boundary(self, trainer: pl.Trainer) -> None:
        self._interrupt_at_boundary, self._stop_after_save = True, False
        raise KeyboardInterrupt(f"stopped by Ctrl-C after step {trainer.global_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint_handler()
        self._refresh_last(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint_handler()
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not self._may_write(trainer):
            return
        if not self.save_last or self._step_in_last == trainer.global_step:
            if self.save_last:
                rank_zero_info(f"{type(exception).__name__}: last.ckpt already holds step {trainer.global_step}")
            return
        reason = self._unsaveable_reason(trainer)
        if reason:
            held = f"step {self._step_in_last}" if self._step_in_last >= 0 else "nothing from this run"
            rank_zero_warn(f"{type(exception).__name__} at step {trainer.global_step}: no checkpoint written ({reason}); "
                           f"last.ckpt holds {held}. Use --checkpoint.every_n_train_steps N to lose at most N steps.")
            return
        self._save_last_only(trainer)
        rank_zero_info(f"{type(exception).__name__}: saved last.ckpt at step {trainer.global_step} ({self.last_model_path})")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint_handler()
        super().teardown(trainer, pl_module, stage)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """Every last.ckpt write of ModelCheckpoint goes through here (a private hook, checked at init)."""
        if self._held_step == trainer.global_step:
            return  # the fit stopped mid-epoch: last.ckpt keeps that step's boundary (Lightning's epoch end would
            # follow, with its validation and the cut epoch counted as finished)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._step_in_last = trainer.global_step

    # -- helpers -------------------------------------------------------------------------------------
    def _may_write(self, trainer: pl.Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt unless it already holds this step (or writing is off: fast_dev_run, sanity check)."""
        if self.save_last and self._may_write(trainer) and self._step_in_last != trainer.global_step:
            self._save_last_only(trainer)

    def _save_last_only(self, trainer: pl.Trainer) -> None:
        # ModelCheckpoint skips any save at a step it already saved: a last.ckpt written between validations must
        # not stop the best checkpoint of a validation that comes at the same step.
        previous = seams.last_saved_step(self)
        self._save_last_checkpoint(trainer, seams.monitor_candidates(self, trainer))
        seams.set_last_saved_step(self, previous)

    def _unsaveable_reason(self, trainer: pl.Trainer) -> str | None:
        """Why the state at an interruption is not a consistent step boundary, or None if it is."""
        if trainer.world_size > 1 and not self._interrupt_at_boundary:
            return "the processes of a multi-process run may have stopped at different points"
        if trainer.validating:
            return "it came during validation"
        loop = trainer.fit_loop.epoch_loop
        batches = loop.batch_progress.current
        if batches.ready != batches.processed:
            return "it came in the middle of a training step"
        if trainer.lightning_module.automatic_optimization:
            step = loop.automatic_optimization.optim_progress.optimizer.step.current
            if step.ready != step.completed:
                return "it came inside an optimizer step"
            if seams.between_micro_batches(trainer):
                return "it came between the micro-batches of an accumulated step"
        return None

    def _install_sigint_handler(self) -> None:
        if not self.stop_on_interrupt or threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except (ValueError, OSError):  # no signals here (e.g. an embedded interpreter)
            self._previous_sigint = None

    def _restore_sigint_handler(self) -> None:
        if self._previous_sigint is not None:
            try:
                signal.signal(signal.SIGINT, self._previous_sigint)
            except (ValueError, OSError):
                pass
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupt_requested:  # second Ctrl-C: stop now
            self._restore_sigint_handler()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        print("\nCtrl-C: stopping at the end of this training step and saving last.ckpt (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)


class StepEnd(NamedTuple):
    """What Lightning does after the training step that just ended (:func:`step_end_outlook`)."""

    validates: bool  # a validation on its schedule follows (the one Lightning adds when a fit stops does not count)
    stops_mid_epoch: bool  # the fit stops after this step although batches of the epoch remain
    between_micro_batches: bool  # this batch did not end an optimizer step (gradient accumulation)


def step_end_outlook(trainer: pl.Trainer) -> StepEnd:
    """Ask Lightning, at ``on_train_batch_end``, what follows the step that just ended, by its own rules.

    * ``validates``: Lightning's validation schedule (``val_check_interval``, ``check_val_every_n_epoch``) has a
      validation after this step. A stop request also makes Lightning validate; that validation is not counted: a
      resumed fit (no stop request) would not run it either.
    * ``stops_mid_epoch``: the fit stops after this step (``trainer.should_stop`` set, by ``max_time``'s Timer or
      another callback, and ``min_epochs`` / ``min_steps`` met; or ``max_steps`` reached) though the epoch has
      batches left. Lightning then still runs the epoch-end hooks and counts the epoch as finished.
    * ``between_micro_batches``: this batch only accumulated gradients (no optimizer step).

    No public API tells these: the answer comes from private members of Lightning's loops (the ones its own loop
    calls), read through :mod:`lit_tasks.run.lightning_seams`. When they are missing (another Lightning than the
    range pinned in ``pyproject.toml``) this raises RuntimeError naming the installed version rather than guess.
    ``callbacks`` that set ``should_stop`` run before the checkpoint callbacks (Lightning orders them last), so a stop
    requested at this step is seen; a LightningModule's own ``on_train_batch_end`` runs after every callback and is
    not.
    """
    validates = seams.scheduled_validation_follows(trainer)  # the schedule alone, not a stop request
    epoch_ends = seams.epoch_batches_done(trainer)
    accumulating = seams.between_micro_batches(trainer)
    can_stop = seams.stop_allowed(trainer)
    max_steps_reached = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    stops = max_steps_reached or (trainer.should_stop and can_stop)
    return StepEnd(validates=validates, stops_mid_epoch=stops and not epoch_ends, between_micro_batches=accumulating)


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
