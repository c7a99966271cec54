"""Face embedding callbacks: TensorBoard projector + ROC figure, and a prediction writer for galleries."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_tasks.callbacks.tensorboard import tensorboard


def roc_figure(fpr: torch.Tensor, tpr: torch.Tensor, title: str = "verification ROC") -> Any:
    """A matplotlib figure of the ROC curve (log-scaled FAR axis, as face papers plot it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr.numpy().clip(1e-5, 1), tpr.numpy(), lw=1.5)
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false accept rate", ylabel="true accept rate",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


class EmbeddingProjector(pl.Callback):
    """At each validation epoch on rank 0: projector view of validation embeddings and the ROC figure.

    Collects the first ``max_images`` images of the validation pairs of the first set (dataloader 0:
    ``image_a`` of each pair) with their flip-fused embeddings (the ``embeddings_a`` the task's
    ``validation_step`` returns) and the ``identity_a`` names as metadata (the pair index where a set has no
    names, e.g. a ``.bin``), then calls ``SummaryWriter.add_embedding`` with ``thumbnail``-px thumbnails. The
    ROC curves come from the task's ``epoch_results`` (pooled over all pairs and processes): ``val/roc`` for
    one unnamed set, ``val/<set>/roc`` for each named set. Skipped during the sanity check and without a
    TensorBoard logger.
    """

    def __init__(self, max_images: int = 300, thumbnail: int = 32, every_n_epochs: int = 1) -> None:
        self.max_images, self.thumbnail, self.every_n_epochs = max_images, thumbnail, every_n_epochs
        self._reset()

    def _reset(self) -> None:
        self.embeddings: list[torch.Tensor] = []
        self.thumbnails: list[torch.Tensor] = []
        self.names: list[str] = []

    def _active(self, trainer: pl.Trainer) -> bool:
        return (trainer.is_global_zero and not trainer.sanity_checking and tensorboard(trainer) is not None
                and trainer.current_epoch % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        room = self.max_images - len(self.names)
        if (room <= 0 or dataloader_idx != 0 or not self._active(trainer) or not isinstance(outputs, dict)
                or "embeddings_a" not in outputs):
            return
        images = batch["image_a"][:room].detach().float().cpu()
        self.embeddings.append(outputs["embeddings_a"][:room].detach().float().cpu())
        self.thumbnails.append(F.interpolate(images, size=(self.thumbnail, self.thumbnail), mode="area"))
        names = batch.get("identity_a") or [str(int(i)) for i in batch["index"][:room]]
        self.names.extend(str(n) for n in names[:room])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        writer, step = tensorboard(trainer), trainer.global_step
        if self.names:
            writer.add_embedding(torch.cat(self.embeddings), metadata=self.names,
                                 label_img=torch.cat(self.thumbnails).clamp(0, 1), global_step=step,
                                 tag="val_embeddings")
        results = getattr(pl_module, "epoch_results", {})
        names = getattr(pl_module, "verification_sets", None) or [None]
        for name in names:
            result = results.get("val" if name is None else f"val/{name}", {})
            if "roc_fpr" in result:
                title = f"{name + ' ' if name else ''}ROC, AUC {float(result['auc']):.4f}"
                fig = roc_figure(result["roc_fpr"], result["roc_tpr"], title)
                writer.add_figure("val/roc" if name is None else f"val/{name}/roc", fig, global_step=step, close=True)
        self._reset()


class EmbeddingWriter(BasePredictionWriter):
    """Write ``lit-tasks predict`` output: ``embeddings.npy`` ``(N, D)`` float32 rows + ``names.txt``.

    Rows are the L2-normalised embeddings of ``predict_step``, in loader order; ``names.txt`` holds one
    image name per line (the row index if the batches carry none). With several processes each rank
    writes ``embeddings.rank{r}.npy`` / ``names.rank{r}.txt``.
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if predictions and isinstance(predictions[0], list):  # several predict dataloaders: concatenate
            predictions = [p for loader in predictions for p in loader]
        embeddings = np.concatenate([p["embeddings"].float().numpy() for p in predictions], axis=0)
        names: list[str] = []
        for p in predictions:
            names.extend(p["names"] if p.get("names") is not None else
                         [str(len(names) + i) for i in range(len(p["embeddings"]))])
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        os.makedirs(self.output_dir, exist_ok=True)
        np.save(os.path.join(self.output_dir, f"embeddings{suffix}.npy"), embeddings.astype(np.float32))
        with open(os.path.join(self.output_dir, f"names{suffix}.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{name}\n" for name in names)
