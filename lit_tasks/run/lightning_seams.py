"""Every private Lightning / torch member lit-tasks relies on, each behind one function that checks it is there.

Nothing public tells these things (each function says what it reads and why). When a release renames or removes a
member, its function raises :class:`RuntimeError` naming the member and the installed version instead of guessing;
``tests/test_lightning_seams.py`` holds a canary per seam that fails on a release that changes it. The supported
range is pinned in ``pyproject.toml`` (README, "Supported versions", says how to move it). Outside ``lit_tasks/run/``
no file touches a private Lightning member (``tests/test_layers.py`` checks it); ``datamodules`` cannot import this
module, so :mod:`datamodules.loaders` guards its one torch seam (``DataLoader._index_sampler``) itself.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SUPPORTED_LIGHTNING = "lightning>=2.6,<2.7"
SUPPORTED_TORCH = "torch>=2.4,<2.15"

# Trainer arguments typed Optional[Union[int, float]] whose int means a count and float a fraction.
INTEGER_OR_FRACTION_ARGUMENTS = ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                                 "limit_predict_batches", "val_check_interval", "overfit_batches")


def seam_error(what: str, missing: str, library: str = "Lightning") -> RuntimeError:
    """The error a missing seam raises: what lit-tasks needs, what the installed version lacks, the supported range."""
    version, supported = ((lightning.__version__, SUPPORTED_LIGHTNING) if library == "Lightning"
                          else (torch.__version__, SUPPORTED_TORCH))
    return RuntimeError(f"lit-tasks needs {library}'s {what}, which the installed {library} {version} lacks "
                        f"({missing}). Supported range: {supported} (pyproject.toml); see README 'Supported versions'")


def member(obj: Any, name: str, what: str, library: str = "Lightning") -> Any:
    """``obj.<name>``, or :func:`seam_error` when ``obj`` has no such member (never a default)."""
    try:
        return getattr(obj, name)
    except AttributeError as error:
        raise seam_error(what, f"{type(obj).__qualname__}.{name}", library) from error


def require_method(owner: type, name: str, parameters: tuple[str, ...], what: str, library: str = "Lightning") -> None:
    """Raise :func:`seam_error` unless ``owner.<name>`` is a function taking ``parameters`` after ``self``."""
    function = inspect.getattr_static(owner, name, None)
    if not inspect.isfunction(function):
        raise seam_error(what, f"{owner.__qualname__}.{name}", library)
    found = tuple(inspect.signature(function).parameters)[1:]
    if found != parameters:
        raise seam_error(what, f"{owner.__qualname__}.{name}{parameters} (it takes {found})", library)


# -- the training loop (TaskCheckpoint: when last.ckpt is written) --------------------------------------------------
def scheduled_validation_follows(trainer: pl.Trainer) -> bool:
    """At ``on_train_batch_end``: does Lightning's validation schedule run a validation after this step?

    ``_TrainingEpochLoop._should_check_val_fx(data_fetcher)`` is the loop's own rule (``val_check_interval``,
    ``check_val_every_n_epoch``). A stop request also makes it say True; that validation is not scheduled (a resumed
    fit, without the request, would not run it), so the request is hidden while asking.
    """
    fit_loop = trainer.fit_loop
    check_val = member(fit_loop.epoch_loop, "_should_check_val_fx", "training-loop validation schedule")
    fetcher = member(fit_loop, "_data_fetcher", "training-loop data fetcher")
    stop_requested = trainer.should_stop
    trainer.should_stop = False
    try:
        return bool(check_val(fetcher))
    finally:
        trainer.should_stop = stop_requested


def epoch_batches_done(trainer: pl.Trainer) -> bool:
    """At ``on_train_batch_end``: was this the epoch's last batch (``_num_ready_batches_reached``)?"""
    return bool(member(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached", "training-loop epoch-end test")())


def stop_allowed(trainer: pl.Trainer) -> bool:
    """Would a stop request end the fit now (``min_epochs`` / ``min_steps`` met: ``_FitLoop._can_stop_early``)?"""
    return bool(member(trainer.fit_loop, "_can_stop_early", "fit-loop min_epochs / min_steps test"))


def between_micro_batches(trainer: pl.Trainer) -> bool:
    """Did the batch that just ran only accumulate gradients, no optimizer step (``_should_accumulate``)?"""
    return bool(member(trainer.fit_loop.epoch_loop, "_should_accumulate", "training-loop gradient-accumulation test")())


# -- ModelCheckpoint (TaskCheckpoint subclasses it) -------------------------------------------------------------------
def check_model_checkpoint_seams() -> None:
    """Raise unless ModelCheckpoint still routes every last.ckpt write through ``_save_last_checkpoint`` and has the
    members TaskCheckpoint reads; an override of a renamed method would be silently dead, so this runs at init."""
    what = "ModelCheckpoint internals (TaskCheckpoint overrides how last.ckpt is written)"
    require_method(ModelCheckpoint, "_save_last_checkpoint", ("trainer", "monitor_candidates"), what)
    require_method(ModelCheckpoint, "_monitor_candidates", ("trainer",), what)
    require_method(ModelCheckpoint, "_should_save_on_train_epoch_end", ("trainer",), what)


def monitor_candidates(callback: ModelCheckpoint, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The metrics ModelCheckpoint names and ranks checkpoints by (``ModelCheckpoint._monitor_candidates``)."""
    return member(callback, "_monitor_candidates", "ModelCheckpoint monitor candidates")(trainer)


def saves_at_train_epoch_end(callback: ModelCheckpoint, trainer: pl.Trainer) -> bool:
    """Does ModelCheckpoint save at the training epoch end rather than after validation (its own rule)?"""
    return bool(member(callback, "_should_save_on_train_epoch_end", "ModelCheckpoint save-moment rule")(trainer))


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step ModelCheckpoint last saved at (it saves nothing more at that step)."""
    return member(callback, "_last_global_step_saved", "ModelCheckpoint last saved step")


def set_last_saved_step(callback: ModelCheckpoint, step: int) -> None:
    """Set what :func:`last_saved_step` reads (only an existing member: a new attribute would be silently ignored)."""
    last_saved_step(callback)
    callback._last_global_step_saved = step


# -- exact resume: the training loader's saved position -------------------------------------------------------------
def pending_loader_states(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """Loader states Lightning read from the checkpoint, not applied yet (``_combined_loader_states_to_load``)."""
    return member(trainer.fit_loop, "_combined_loader_states_to_load", "fit-loop pending loader states")


def training_loaders(trainer: pl.Trainer) -> list[Any] | None:
    """The fit loop's training DataLoaders if it has set them up (``_FitLoop._combined_loader``), else None."""
    combined = member(trainer.fit_loop, "_combined_loader", "fit-loop combined loader")
    return None if combined is None else list(combined.flattened)


def apply_pending_loader_states(trainer: pl.Trainer) -> None:
    """Load the pending states into the training loaders and restart the fit loop's fetcher on them."""
    fit_loop = trainer.fit_loop
    load = member(fit_loop, "_load_combined_loader_states", "fit-loop loader-state restore")
    fetcher = member(fit_loop, "_data_fetcher", "training-loop data fetcher")
    load()
    if fetcher is not None:
        iter(fetcher)


def shutdown_loader_workers(loader: Any) -> None:
    """Stop a DataLoader's worker processes and drop its iterator (Lightning's own helper for this)."""
    try:
        from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator
    except ImportError as error:
        raise seam_error("loader shutdown helper", "lightning.pytorch.utilities.combined_loader."
                         "_shutdown_workers_and_reset_iterator") from error
    _shutdown_workers_and_reset_iterator(loader)


# -- the LightningModule, precision and DDP -------------------------------------------------------------------------
def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer ``module`` is attached to, or None (``LightningModule.trainer`` raises instead of telling)."""
    return member(module, "_trainer", "LightningModule trainer reference")


def grad_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale this step's gradients carry: the GradScaler's scale, 1.0 without one.

    Partial FC divides it out of its centre gradients. ``16-mixed`` without a scaler visible at ``Trainer.scaler``
    (another precision plugin, or a Lightning that moved it) raises: the centres would be updated with scaled
    gradients.
    """
    scaler = trainer.scaler
    if scaler is None:
        if trainer.precision == "16-mixed":
            raise seam_error("GradScaler of 16-mixed precision at Trainer.scaler (Partial FC divides its scale out "
                             "of the centre gradients)", f"{type(trainer.precision_plugin).__qualname__}.scaler")
        return 1.0
    return float(scaler.get_scale()) if scaler.is_enabled() else 1.0


def ignore_in_ddp(module: nn.Module, names: list[str]) -> None:
    """Make DDP neither broadcast nor shape-check these parameters / buffers of ``module`` (per-process shards)."""
    member(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model",
           "DistributedDataParallel ignore list", library="torch")(module, names)


# -- the CLI: the Trainer's integer-or-fraction arguments ------------------------------------------------------------
def int_before_float(hint: Any) -> Any:
    """``hint`` with ``int`` tried before ``float`` when it is a Union of both (else ``hint`` itself)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) not in (typing.Union, types.UnionType) or int not in args or float not in args:
        return hint
    if args.index(int) < args.index(float):
        return hint
    return typing.Union[tuple(sorted(args, key=lambda a: a is not int))]  # a tuple of plain types: cached by order


def parse_integer_limits_as_counts(cls: type = pl.Trainer) -> None:
    """Make ``--trainer.limit_train_batches 1`` mean one batch, as Lightning documents, on every machine.

    The Trainer annotates ``limit_*_batches``, ``val_check_interval`` and ``overfit_batches`` as
    ``Optional[Union[int, float]]``; jsonargparse tries a Union's members in order and ``float`` accepts "1". Python's
    typing cache treats ``Union[int, float]`` and ``Union[float, int]`` as equal keys, so which order the annotation
    ends up with depends on what other imports built first (installing ``rich`` changed it): without this, "1" became
    1.0, i.e. 100 % of the batches. The annotations are rewritten int-first, before the parser reads them; an
    annotation this cannot rewrite (a string, another form) raises rather than leave "1" to mean 100 %.
    """
    annotations = cls.__init__.__annotations__
    for name, hint in list(annotations.items()):
        annotations[name] = int_before_float(hint)
    for name in INTEGER_OR_FRACTION_ARGUMENTS:
        args = typing.get_args(annotations.get(name))
        if int not in args or float not in args or args.index(int) > args.index(float):
            raise seam_error(f"Trainer.__init__ annotation of {name} as a Union of int and float (rewritten int-first "
                             "so that an integer means a count)", f"it is {annotations.get(name)!r}")
