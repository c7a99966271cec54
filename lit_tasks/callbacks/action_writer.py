"""Write `lit-tasks predict` output of online action detection: per-frame class probabilities per video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter


def frame_table(predictions: Sequence[dict[str, torch.Tensor]],
                key: str = "probs") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Batches of ``{key, "session", "frame"}`` -> ``{session: (frames (N,), values (N, ...))}``, sorted by frame,
    each (session, frame) once (a padding sampler may repeat one)."""
    session = torch.cat([p["session"] for p in predictions]).numpy()
    frame = torch.cat([p["frame"] for p in predictions]).numpy()
    values = torch.cat([p[key] for p in predictions]).float().numpy()
    out = {}
    for k in np.unique(session):
        rows = np.flatnonzero(session == k)
        frames, first = np.unique(frame[rows], return_index=True)
        out[int(k)] = (frames, values[rows[first]])
    return out


class ActionPredictionWriter(BasePredictionWriter):
    """At the end of `predict`: ``<output_dir>/<session>.npy`` per video and ``<output_dir>/class_names.json``.

    ``<session>.npy`` is ``(T, C)`` float32: row t the class probabilities of frame t (softmax over the
    non-ambiguous classes, the ambiguous column 0), T = the last predicted frame + 1; a frame the
    DataModule's frame rule did not predict (e.g. ``frames="full_window"``) is a row of NaN. With
    ``anticipation=True`` also ``<session>.anticipation.npy`` ``(T, Q, C)``: row t the probabilities of
    frames t + 1 .. t + Q as anticipated at frame t. Session names come from the DataModule's
    ``predict_set.session_names``. Expects ``predict_step`` to return ``probs``, ``anticipation``,
    ``session`` and ``frame`` (``ActionDetectionTask`` does).

    Existing files are never replaced unless ``overwrite=True``: the check covers every file before any is
    written. Under DDP every rank's predictions are gathered and rank 0 writes.

    Args:
        output_dir: folder (created).
        anticipation: also write the anticipated frames' probabilities.
        overwrite: replace existing files.
    """

    def __init__(self, output_dir: str = "predictions", anticipation: bool = False, overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.anticipation = anticipation
        self.overwrite = overwrite

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        flat = [p for group in predictions for p in (group if isinstance(group, list) else [group])]
        keys = ("probs", "anticipation", "session", "frame") if self.anticipation else ("probs", "session", "frame")
        flat = [{k: p[k] for k in keys} for p in flat]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, flat)  # every rank reaches this; only rank 0 writes
            flat = [p for part in gathered for p in part]
        if not trainer.is_global_zero or not flat:
            return
        set_ = getattr(getattr(trainer, "datamodule", None), "predict_set", None)
        names = list(getattr(set_, "session_names", []) or [])
        name = lambda k: (names[k] if k < len(names) else f"session{k:05d}").replace("/", "_")  # noqa: E731
        tables = {"": frame_table(flat, "probs")}
        if self.anticipation:
            tables[".anticipation"] = frame_table(flat, "anticipation")
        files = {self.output_dir / f"{name(k)}{suffix}.npy": table[k]
                 for suffix, table in tables.items() for k in table}
        class_file = self.output_dir / "class_names.json"
        if not self.overwrite:
            existing = [p for p in [*files, class_file] if p.exists()]
            if existing:
                raise FileExistsError(f"ActionPredictionWriter: {existing[0]} exists ({len(existing)} of the files to "
                                      "write do); pass overwrite=True or another output_dir")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path, (frames, values) in files.items():
            array = np.full((int(frames[-1]) + 1, *values.shape[1:]), np.nan, dtype=np.float32)
            array[frames] = values
            np.save(path, array)
        h = pl_module.hparams
        class_names = list(h.get("class_names") or [str(c) for c in range(h.num_classes)])
        class_file.write_text(json.dumps(class_names, indent=1))
        print(f"wrote per-frame probabilities of {len(tables[''])} videos to {self.output_dir}")
