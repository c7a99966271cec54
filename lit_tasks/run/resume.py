"""Exact resume: what Lightning does not restore from a checkpoint, restored when a fit resumes.

Lightning restores the weights, optimizer, schedulers, AMP scaler and loop counters, but

* not the random generators: after ``fit --ckpt_path last`` dropout masks, Partial FC's negative sampling and
  random augmentations drawn in the main process would differ from the uninterrupted run. :class:`ExactResume`
  saves the torch (CPU and CUDA), numpy and Python generator states of every process (gathered to the saving
  process) and restores each process's own;
* the training loader's position only if the loader was not set up before the checkpoint was loaded. Tasks whose
  ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (every lit-tasks task: the schedules are
  per step) make Lightning set the loader up first, and the saved position
  (:class:`datamodules.loaders.ResumableDataLoader`) would be ignored. :class:`ExactResume` hands it over.

Both happen at ``on_train_start``: after the checkpoint is loaded and before the first resumed batch, the same
point of the random streams and of the data as when the checkpoint was written (at a step boundary). A run killed
and resumed from a mid-epoch checkpoint then computes the same losses as one that never stopped (deterministic
kernels, ``num_workers=0``; see the loader for what workers change).

Stored as tensors and lists of ints, so checkpoints still load with ``weights_only=True``. ``lit-tasks`` adds it
to every Trainer; from Python pass ``Trainer(callbacks=[ExactResume(), ...])``. Gathering the states is a
collective: as Lightning requires, call ``trainer.save_checkpoint`` on every process. Generators of DataLoader
worker processes are not included (workers are seeded afresh when they start).
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from lit_tasks.run import lightning_seams as seams


def collect_random_states() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / Python generator states, as tensors and plain lists."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def restore_random_states(states: dict[str, Any]) -> None:
    """Set this process's generators to ``states`` (from :func:`collect_random_states`)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class ExactResume(pl.Callback):
    """Save every process's generator states in checkpoints; on resume restore them and the data position.

    A world size different from the saved one leaves the generators as seeded (warned).
    """

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = collect_random_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("per_rank")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hand_over_loader_states(trainer)
        loaded, self._loaded = self._loaded, None
        if not loaded:
            return
        if len(loaded) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds random generator states of {len(loaded)} processes, this run has "
                           f"{trainer.world_size}: generators stay as seeded (the resumed run cannot repeat the "
                           "uninterrupted one's random draws exactly)")
            return
        restore_random_states(loaded[trainer.global_rank])


def hand_over_loader_states(trainer: pl.Trainer) -> bool:
    """Give the training loaders the positions Lightning read from the checkpoint but did not apply.

    Lightning applies them when it sets the training loader up in ``fit``; when the loader was set up earlier
    (``estimated_stepping_batches`` in ``configure_optimizers``) they stay pending. Then they are loaded here and
    the loader iterator is made afresh so the next batch comes from the saved position. Returns whether it did.
    The fit loop's members it needs have no public API (:mod:`lit_tasks.run.lightning_seams`).
    """
    pending = seams.pending_loader_states(trainer)
    loaders = seams.training_loaders(trainer)
    if not pending or loaders is None or not trainer.fit_loop.restarting:
        return False
    # Persistent workers started by the early set-up may already be reading the wrong pass: stop them first.
    for loader in loaders:
        seams.shutdown_loader_workers(loader)
    seams.apply_pending_loader_states(trainer)
    return True
