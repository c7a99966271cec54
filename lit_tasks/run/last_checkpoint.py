"""``--ckpt_path last``: which checkpoint file it means, and the run folder a fit resumed from it logs in.

The newest ``last.ckpt`` (or ``last-vN.ckpt``) of every version folder of the run the config describes (its logger's
folder, or ``--checkpoint.dirpath``). The resumed fit goes on in that version folder: the logger's public ``version``
init argument is set in the parsed config before the Trainer is built. Used by :class:`lit_tasks.cli.TasksCLI`.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
import re
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_tasks.run.checkpoint_io import TEMP_SUFFIX

LAST_NAME = re.compile(r"last(-v\d+)?\.ckpt")


def checkpoint_folders(config: Any) -> list[str]:
    """Glob patterns of the folders ``fit`` writes checkpoints to, for every version of the run, from the config.

    ``--checkpoint.dirpath`` if given; else ``<logger root>/*/checkpoints`` (TensorBoard, CSV and other loggers
    with a ``root_dir``: every version of the run); without a logger ``<default_root_dir>/checkpoints``.
    """
    dirpath = (config.get("checkpoint") or {}).get("dirpath") if hasattr(config.get("checkpoint"), "get") else None
    if dirpath:
        return [glob.escape(str(dirpath))]
    logger_root = logger_root_dir(config)
    if logger_root:
        return [os.path.join(glob.escape(logger_root), "*", "checkpoints")]
    return [os.path.join(glob.escape(trainer_root_dir(config)), "checkpoints")]


def trainer_root_dir(config: Any) -> str:
    """``--trainer.default_root_dir``, or the working directory as the Trainer defaults it."""
    trainer = config.get("trainer") or {}
    root_dir = trainer.get("default_root_dir") if hasattr(trainer, "get") else None
    return str(root_dir) if root_dir else os.getcwd()


def first_logger(config: Any) -> Any:
    """The config of the run's first logger (``trainer.logger`` or its first entry): a class spec, True, False, None."""
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger") if hasattr(trainer, "get") else None
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    return logger


def logger_root_dir(config: Any) -> str | None:
    """The folder holding the first logger's version folders, None when it has none (no logger, an unusual one).

    A class spec is built to ask (loggers create no folder before they log); ``True`` / None is the Trainer's
    default TensorBoard logger in ``<default_root_dir>/lightning_logs``.
    """
    logger = first_logger(config)
    if logger is True or logger is None:
        return os.path.join(trainer_root_dir(config), "lightning_logs")
    if logger is False or not hasattr(logger, "get") or not logger.get("class_path"):
        return None
    init_args = logger.get("init_args") or {}
    init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    try:
        instance = logger_class(logger)(**init_args)  # creates no folder yet
        root = getattr(instance, "root_dir", None)
    except Exception:  # noqa: BLE001  (an unusual logger: the caller falls back to the Trainer's default folder)
        root = None
    return str(root) if root else None


def logger_class(logger: Any) -> type:
    """The class a logger spec (``class_path`` + ``init_args``) names."""
    module, _, name = str(logger["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module), name)


def find_last_checkpoint(patterns: list[str]) -> str | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) in the folders matching ``patterns``; None if there is none."""
    found = [os.path.join(folder, name) for pattern in patterns for folder in glob.glob(pattern) if os.path.isdir(folder)
             for name in os.listdir(folder) if LAST_NAME.fullmatch(name) and not name.endswith(TEMP_SUFFIX)]
    return max(found, key=os.path.getmtime) if found else None


def resolve_last_checkpoint(config: Any, subcommand: str) -> str | None:
    """The file ``--ckpt_path last`` means: the newest last.ckpt of the run (see :func:`checkpoint_folders`).

    When there is none, ``fit`` starts from the beginning (a warning names the folders searched, e.g. a first run of
    a job script that always passes ``--ckpt_path last``); the other subcommands stop with that message.
    """
    patterns = checkpoint_folders(config)
    path = find_last_checkpoint(patterns)
    if path is not None:
        step = ""
        try:
            step = f" (step {torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('global_step')})"
        except Exception:  # noqa: BLE001  (the message only)
            pass
        rank_zero_info(f"--ckpt_path last: {path}{step}")
        return path
    searched = ", ".join(patterns)
    message = f"--ckpt_path last: no last.ckpt in {searched} (no earlier run of this config saved one"
    if subcommand != "fit":
        raise FileNotFoundError(message + "): pass the checkpoint file to evaluate")
    rank_zero_warn(message + ": it was stopped before its first checkpoint, or this is the first run); training starts "
                   "from the beginning. Save mid-epoch with --checkpoint.every_n_train_steps N.")
    return None


def continue_logging_in(config: Any, checkpoint: str) -> None:
    """Give the first logger the version folder holding ``checkpoint`` (``<root>/<version>/checkpoints/x.ckpt``)
    through its ``version`` init argument, when that folder is one of the logger's versions, so the resumed run's logs
    and checkpoints continue that run's. ``config`` is the subcommand's parsed config, before the Trainer is built."""
    logger, root = first_logger(config), logger_root_dir(config)
    version_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    if not root or os.path.dirname(version_dir) != os.path.abspath(root):
        return
    name = os.path.basename(version_dir)
    match = re.fullmatch(r"version_(\d+)", name)
    version = int(match.group(1)) if match else name
    if config["trainer"].get("logger") in (True, None):  # the Trainer's default logger, spelled out with the version
        config["trainer"]["logger"] = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                                                init_args=Namespace(save_dir=trainer_root_dir(config), version=version))
    elif hasattr(logger, "get") and "version" in inspect.signature(logger_class(logger)).parameters:
        if logger.get("init_args") is None:
            logger["init_args"] = Namespace()
        logger["init_args"]["version"] = version
