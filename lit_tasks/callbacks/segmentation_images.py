"""TensorBoard pictures for semantic segmentation: mask overlays and the normalised confusion matrix.

Once per validation epoch on rank 0: the first ``num_images`` images of the first batch, each shown as
image | ground truth overlaid | prediction overlaid (``torchvision.utils.draw_segmentation_masks``), and the
row-normalised confusion matrix (rows = ground truth) as a matplotlib figure.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from lit_tasks.callbacks.tensorboard import tensorboard


def class_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: class id bits spread over the high bits of R, G and B.

    Bit ``3k``/``3k+1``/``3k+2`` of the id sets bit ``7-k`` of R/G/B, so neighbouring ids get clearly
    different colours and id 0 is black.
    """
    colours = []
    for cid in range(num_classes):
        rgb = [0, 0, 0]
        value, shift = cid, 7
        while value and shift >= 0:
            for ch in range(3):
                rgb[ch] |= ((value >> ch) & 1) << shift
            value >>= 3
            shift -= 1
        colours.append(tuple(rgb))
    return colours


def overlay_mask(image: Tensor, mask: Tensor, num_classes: int, alpha: float = 0.5) -> Tensor:
    """``(3, H, W)`` float [0, 1] or uint8 image with an ``(H, W)`` class-id mask blended in (ignored ids left bare)."""
    canvas = image if image.dtype == torch.uint8 else (image.detach().float().clamp(0, 1) * 255).to(torch.uint8)
    canvas = canvas.cpu()
    mask = mask.cpu()
    present = [c for c in torch.unique(mask).tolist() if 0 <= c < num_classes]
    if not present:
        return canvas
    masks = mask[None] == torch.tensor(present)[:, None, None]
    palette = class_palette(num_classes)
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=[palette[c] for c in present])


def confusion_figure(confmat: Tensor, class_names: list[str]):
    """Matplotlib figure of the confusion matrix normalised per ground-truth row (recall per class)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    cm = confmat.double()
    norm = (cm / cm.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    n = len(class_names)
    size = min(3 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


class SegmentationImageLogger(pl.Callback):
    """Log mask overlays of a few validation images and the confusion matrix to TensorBoard (rank 0).

    Needs a task whose ``validation_step`` returns ``{"preds": (B, H, W)}`` and that keeps its epoch's scores in
    ``epoch_results["val"]`` (``BaseTask.log_epoch_metric`` does). ``SemanticSegmentationTask`` attaches it
    itself (``num_log_images``).

    Args:
        num_images: images of the first validation batch to draw.
        alpha: opacity of the masks.
        confusion_matrix: also log the normalised confusion matrix figure.
    """

    def __init__(self, num_images: int = 4, alpha: float = 0.5, confusion_matrix: bool = True) -> None:
        self.num_images = num_images
        self.alpha = alpha
        self.confusion_matrix = confusion_matrix
        self._pictures: list[Tensor] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking or tensorboard(trainer) is None:
            return
        num_classes = int(pl_module.hparams.num_classes)
        self._pictures = []
        sizes = batch.get("size")
        for i in range(min(self.num_images, batch["image"].shape[0])):
            h, w = (int(v) for v in sizes[i]) if sizes is not None else batch["image"].shape[-2:]
            image = batch["image"][i, :, :h, :w]
            gt = overlay_mask(image, batch["mask"][i, :h, :w], num_classes, self.alpha)
            pred = overlay_mask(image, outputs["preds"][i, :h, :w], num_classes, self.alpha)
            plain = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
            self._pictures.append(torch.cat([plain, gt, pred], dim=-1))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the task's on_validation_epoch_end, so epoch_results holds this epoch's DDP-summed matrix.
        writer = tensorboard(trainer)
        if not trainer.is_global_zero or trainer.sanity_checking or writer is None:
            return
        step = trainer.global_step
        if self._pictures:
            h = max(p.shape[-2] for p in self._pictures)
            w = max(p.shape[-1] for p in self._pictures)
            padded = [torch.nn.functional.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in self._pictures]
            writer.add_image("val/masks (image | truth | prediction)", make_grid(padded, nrow=1, padding=2), step)
            self._pictures = []
        confmat = getattr(pl_module, "epoch_results", {}).get("val", {}).get("confmat")
        if self.confusion_matrix and confmat is not None:
            names = pl_module.class_names() if hasattr(pl_module, "class_names") else [str(i) for i in range(len(confmat))]
            writer.add_figure("val/confusion_matrix", confusion_figure(confmat, names), step, close=True)
