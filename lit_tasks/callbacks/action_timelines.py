"""TensorBoard figure for online action detection: ground-truth timelines above the predicted probabilities.

Once per validation epoch on rank 0: for the first ``num_streams`` validation sessions, a coloured strip of
the per-frame ground truth (one colour per class, ambiguous frames hatched grey) and, beneath it, the
predicted probability of every action class over time in the same colours. Under DDP rank 0 draws the
frames it evaluated (a distributed sampler deals frames out, so lines join every other frame).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lit_tasks.callbacks.tensorboard import tensorboard


def class_colours(num_classes: int, background_index: int | None, ambiguous_index: int | None) -> np.ndarray:
    """``(C, 4)`` RGBA: matplotlib's tab20 cycle for the actions, white background, grey ambiguous."""
    import matplotlib

    cycle = matplotlib.colormaps["tab20"].colors
    colours, k = np.zeros((num_classes, 4)), 0
    for c in range(num_classes):
        if c == background_index:
            colours[c] = (1.0, 1.0, 1.0, 1.0)
        elif c == ambiguous_index:
            colours[c] = (0.6, 0.6, 0.6, 1.0)
        else:
            colours[c] = (*cycle[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20], 1.0)
            k += 1
    return colours


def timeline_figure(streams: list[dict[str, np.ndarray]], class_names: list[str], background_index: int | None,
                    ambiguous_index: int | None):
    """Matplotlib figure: per stream a ground-truth strip and the action probabilities beneath it.

    Args:
        streams: dicts with ``name`` (str), ``frame`` ``(N,)``, ``labels`` ``(N,)`` class index per frame and
            ``probs`` ``(N, C)``, sorted by frame.
        class_names: a name per class.
        background_index, ambiguous_index: columns drawn white / grey and not as probability lines.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    c = len(class_names)
    colours = class_colours(c, background_index, ambiguous_index)
    actions = [k for k in range(c) if k not in (background_index, ambiguous_index)]
    fig, axes = plt.subplots(2 * len(streams), 1, figsize=(11, 2.6 * len(streams)), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 4] * len(streams)})
    for i, s in enumerate(streams):
        strip, lines = axes[2 * i, 0], axes[2 * i + 1, 0]
        frames = s["frame"]
        extent = (frames.min() - 0.5, frames.max() + 0.5, 0, 1) if len(frames) else (0, 1, 0, 1)
        full = np.full(int(frames.max()) + 1 if len(frames) else 1, -1)
        full[frames] = s["labels"]
        image = np.where(full[:, None] >= 0, 0, 1) * np.array([[1.0, 1.0, 1.0, 0.0]])
        image[full >= 0] = colours[full[full >= 0]]
        strip.imshow(image[None, int(frames.min()) if len(frames) else 0:], aspect="auto", extent=extent,
                     interpolation="nearest")
        strip.set_yticks([])
        strip.set_xticks([])
        strip.set_title(f"{s['name']}: ground truth (top), predicted probabilities", fontsize=9, loc="left")
        for k in actions:
            if s["probs"].shape[0] and (s["probs"][:, k].max() > 0.05 or (s["labels"] == k).any()):
                lines.plot(frames, s["probs"][:, k], color=colours[k], lw=1.2, label=class_names[k])
        lines.set_ylim(0, 1.02)
        lines.set_xlim(extent[0], extent[1])
        lines.set_ylabel("p")
        if lines.get_legend_handles_labels()[0]:
            lines.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    return fig


class ActionTimelineLogger(pl.Callback):
    """Log ground-truth timelines and predicted class probabilities of a few validation sessions (rank 0).

    Needs a task whose ``validation_step`` returns ``probs`` ``(B, C)``, ``target`` ``(B, C)``, ``session``
    and ``frame`` ``(B,)``, as ``ActionDetectionTask`` does (it attaches this callback itself,
    ``num_log_streams``). Session names come from the DataModule's ``val_set.session_names`` when it has them.

    Args:
        num_streams: sessions drawn (the first ones of the validation split).
    """

    def __init__(self, num_streams: int = 3) -> None:
        self.num_streams = num_streams
        self._parts: list[dict[str, Tensor]] = []

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and tensorboard(trainer) is not None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer) or not isinstance(outputs, dict):
            return
        keep = outputs["session"] < self.num_streams
        if keep.any():
            self._parts.append({k: outputs[k][keep].detach().float().cpu() if k in ("probs", "target")
                                else outputs[k][keep].cpu() for k in ("probs", "target", "session", "frame")})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = tensorboard(trainer)
        if not self._active(trainer) or not self._parts:
            return
        parts = {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}
        self._parts = []
        val_set = getattr(getattr(trainer, "datamodule", None), "val_set", None)
        names = list(getattr(val_set, "session_names", []) or [])
        streams = []
        for k in sorted(set(parts["session"].tolist())):
            rows = parts["session"] == k
            order = parts["frame"][rows].argsort()
            streams.append({"name": names[k] if k < len(names) else f"session {k}",
                            "frame": parts["frame"][rows][order].numpy(),
                            "labels": parts["target"][rows][order].argmax(1).numpy(),
                            "probs": parts["probs"][rows][order].numpy()})
        h = pl_module.hparams
        class_names = (pl_module.class_names() if hasattr(pl_module, "class_names")
                       else [str(c) for c in range(h.num_classes)])
        figure = timeline_figure(streams, class_names, h.get("background_index"), h.get("ambiguous_index"))
        writer.add_figure("val/streams (truth | probabilities)", figure, trainer.global_step, close=True)
