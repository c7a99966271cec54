"""Write segmentation predictions to disk: one class-id PNG per input image (and optionally a colour overlay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from lit_tasks.callbacks.segmentation_images import overlay_mask


def save_class_png(mask: np.ndarray, path: str | Path) -> None:
    """``(H, W)`` class ids as a single-channel PNG (8-bit below 256 classes, else 16-bit): pixel value = id."""
    mask = np.asarray(mask)
    if mask.max(initial=0) < 256:
        Image.fromarray(mask.astype(np.uint8)).save(path)  # 2-D uint8 -> mode "L"
    elif mask.max() < 65536:
        Image.fromarray(mask.astype(np.uint16)).save(path)
    else:
        raise ValueError(f"cannot store class ids up to {int(mask.max())} in a PNG ({path})")


class SegmentationPredictionWriter(BasePredictionWriter):
    """For every predicted image, ``<output_dir>/<stem>.png`` with its class ids at the input file's size.

    With ``overlay=True`` also ``<output_dir>/overlay/<stem>.jpg``: the input with the prediction blended in.
    Expects ``predict_step`` to return a list of ``{"mask": (h, w), "path": str}`` per batch, as
    ``SemanticSegmentationTask`` does. Rank 0 and every other rank write their own images.

    Nothing is overwritten: a run refuses an ``output_dir`` that already holds PNGs (unless ``overwrite=True``),
    and two inputs whose names share a stem (``a.jpg``, ``a.png``) are an error naming both.

    Args:
        output_dir: folder for the PNGs (created).
        overlay: also write colour overlays.
        alpha: overlay opacity.
        overwrite: allow writing into a folder that already holds predictions.
    """

    def __init__(self, output_dir: str = "predictions", overlay: bool = False, alpha: float = 0.5,
                 overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overlay = overlay
        self.alpha = alpha
        self.overwrite = overwrite
        self._written: dict[str, str] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = {}
        existing = sorted(self.output_dir.glob("*.png")) if self.output_dir.is_dir() else []
        if existing and not self.overwrite:
            raise FileExistsError(f"SegmentationPredictionWriter: {self.output_dir} already holds {len(existing)} PNG "
                                  f"file(s) (e.g. {existing[0].name}); choose another output_dir or pass overwrite=True")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Sequence[dict],
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for i, pred in enumerate(prediction):
            stem = Path(pred["path"]).stem
            if stem in self._written:
                raise ValueError(f"SegmentationPredictionWriter: {self._written[stem]} and {pred['path']} would both be "
                                 f"written to {stem}.png; rename one of them")
            self._written[stem] = str(pred["path"])
            mask = pred["mask"]
            save_class_png(mask.numpy(), self.output_dir / f"{stem}.png")
            if self.overlay:
                self._write_overlay(batch, i, mask, stem, int(pl_module.hparams.num_classes))

    def _write_overlay(self, batch: dict, i: int, mask: torch.Tensor, stem: str, num_classes: int) -> None:
        image = batch["image"][i]
        if "size" in batch:
            h, w = (int(v) for v in batch["size"][i])
            image = image[:, :h, :w]
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            image = F.interpolate(image[None].float(), size=tuple(mask.shape), mode="bilinear", align_corners=False)[0]
        picture = overlay_mask(image, mask.long(), num_classes, self.alpha)
        folder = self.output_dir / "overlay"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(folder / f"{stem}.jpg", quality=90)
