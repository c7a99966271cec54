"""Crash-safe checkpoint files: write to a temporary file in the same folder, fsync, rename into place.

A process killed at any moment (SIGKILL, power loss, a full disk) must never leave a run without a loadable
checkpoint. Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction that stages the bytes in the
*system* temporary folder and moves them over the target: when that folder is on another filesystem (a tmpfs
``/tmp`` and checkpoints on a network disk, the usual cluster setup) the move is a copy that truncates the target
first, so a kill during the copy leaves a half-written ``last.ckpt`` and no previous one, and nothing is fsynced.

:class:`AtomicCheckpointIO` instead writes ``.NAME.<random>.tmp`` beside the target, flushes and fsyncs it,
``os.replace``-s it over the target (atomic on POSIX and Windows within one filesystem) and fsyncs the folder, so
the target path always holds either the previous complete checkpoint or the new complete one. Temporary files a
killed writer left behind are removed by the next save of the same name. ``lit-tasks`` installs it on every
Trainer whose strategy uses the plain ``TorchCheckpointIO``; from Python pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
Remote paths (``s3://``, ``gs://``, ...) keep Lightning's fsspec path: object stores publish an object whole.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins import TorchCheckpointIO

TEMP_SUFFIX = ".tmp"
CheckpointPath = str | os.PathLike  # a checkpoint path, as Lightning's CheckpointIO takes it


def temporary_name_pattern(path: str) -> str:
    """Glob of the temporary files :func:`atomic_torch_save` makes for ``path`` (``DIR/.NAME.*.tmp``)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{TEMP_SUFFIX}")


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: CheckpointPath) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds the old file or the complete new one, never a part.

    The bytes go to ``.NAME.<random>.tmp`` in the target's folder, are flushed and fsynced, then renamed over
    ``path`` with ``os.replace`` and the folder is fsynced. On any error (including KeyboardInterrupt) the
    temporary file is removed and the target is untouched. Leftovers of a writer killed earlier are removed first.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(temporary_name_pattern(path)):
        try:
            os.remove(stale)
        except OSError:
            pass
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the permissions a plain open() would
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (see the module docstring).

    Loading and removal are Lightning's. Used for ``last.ckpt``, the best checkpoints and any
    ``trainer.save_checkpoint`` call.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: CheckpointPath,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":  # what Lightning's own local test does
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def install_atomic_checkpoint_io(trainer: Any) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` if it uses the plain ``TorchCheckpointIO``.

    Strategies with their own checkpoint IO (FSDP / DeepSpeed sharded saves, a user's plugin) are left alone.
    Returns whether it was installed.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
