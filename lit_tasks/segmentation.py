"""Semantic segmentation with dilated-convolution networks: DeepLabV3 / DeepLabV3+, PSPNet and FCN.

The network (:class:`lit_tasks.models.segmentation.segmenter.Segmenter`) is a dilated backbone + context head with logits
at the input size. Training minimises per-pixel cross entropy over the labelled pixels, plus 0.4 x the loss
of an auxiliary FCN head on stage 3 (PSPNet §3.3, as mmsegmentation's recipes do;
:class:`~lit_tasks.losses.cross_entropy.SegmentationCriterion`). Metrics come from one
dataset-wide confusion matrix (PA, MPA, mIoU, FWIoU; REFERENCE.md §7.1).

Batches are dicts: ``image`` float ``(B, 3, H, W)`` in [0, 1], ``mask`` int64 ``(B, H, W)`` with
``ignore_index`` for unlabelled pixels, ``size`` ``(B, 2)`` (each image before batch padding); for prediction
also ``orig_size`` ``(B, 2)`` (the file) and ``path``. Validation, test and prediction run every image at its
own size (images of one size together), so an image's prediction never depends on its batch-mates.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_tasks.base import STAGES, BaseTask
from lit_tasks.callbacks.segmentation_images import SegmentationImageLogger
from lit_tasks.losses.cross_entropy import SegmentationCriterion
from lit_tasks.metrics.segmentation import SegmentationMetrics, format_class_table
from lit_tasks.models.published import published_weights
from lit_tasks.models.segmentation.convert import read_segmentation_weights
from lit_tasks.models.segmentation.segmenter import Segmenter, SegmenterName
from lit_tasks.ops.images import group_by_size, sliding_windows
from lit_tasks.schedules import warmup_poly


class SemanticSegmentationTask(BaseTask):
    """Semantic segmentation: dilated backbone + context head, per-pixel cross entropy, confusion-matrix metrics.

    Args:
        num_classes: number of classes (counting background when it is a class); linked from the DataModule.
        model: ``"deeplabv3plus"``, ``"deeplabv3"``, ``"pspnet"`` or ``"fcn"``.
        backbone: any timm model with ``features_only`` and ``output_stride`` support (ResNets, MobileNetV3,
            EfficientNets, RegNets, ...).
        pretrained: load timm's ImageNet weights (downloads; False keeps everything offline).
        output_stride: 8 or 16 (dilated last stages), or 32 (no dilation).
        feature_indices: timm feature indices of (stride-4 skip, stage feeding the auxiliary head, last
            stage); ``[1, 3, 4]`` suits backbones with five feature levels at strides 2..32.
        aspp_rates: ASPP atrous rates; None takes (6, 12, 18) at output stride 16 and (12, 24, 36) at 8.
        pool_scales: PSP pyramid bins.
        head_channels: width of the ASPP / decoder / FCN convs (the PSP bottleneck uses twice this).
        dropout: dropout before the classifiers.
        aux_weight: weight of the auxiliary FCN head's loss on stage 3 (0 builds no auxiliary head).
        fcn_heads: the FCN heads (``fcn``'s head, every auxiliary head): ``"mmseg"`` (``head_channels`` wide; ``fcn``:
            two convs, input concatenated) or ``"torchvision"`` (one conv of in_channels // 4, torchvision's FCNHead).
            None = ``"mmseg"``, or what ``pretrained_weights`` needs.
        pretrained_weights: a local published weights file loaded when the task is built (torchvision
            ``deeplabv3_resnet50/101`` / ``fcn_resnet50/101``, mmsegmentation PSPNet R50/R101-D8), as downloaded or
            converted by ``tools/convert_weights.py``; architecture options left at None take the file's values, a
            different value is an error naming it; every key is matched both ways. Checkpoints of a fit do not name
            the file. BatchNorm keeps training, as torchvision's and mmsegmentation's recipes do (SyncBN).
        pretrained_class_rows: the file's class row for each of our classes (a subset); reinit_class_head: new class
            heads (main and auxiliary) for other classes.
        class_weights: optional per-class cross-entropy weights (length ``num_classes``).
        ignore_index: mask label that is neither trained on nor scored; linked from the DataModule. Must be
            >= num_classes: negative values are refused (mask files hold unsigned ids, so none can carry one).
        class_names: names for per-class logs; linked from the DataModule.
        channels_last: run convolutions in NHWC (about 1.5x faster for conv nets on CPU and tensor cores).
        lr, weight_decay: SGD recipe (momentum 0.9, poly decay with power 0.9) used when ``optimizer`` is None.
        warmup_steps: linear warm-up of the default schedule.

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        tta_flip: test/predict: also run the horizontally flipped image and average the probabilities.
        tta_scales: test/predict: run these rescaled copies too and average (e.g. ``[0.75, 1.0, 1.25]``).
        slide_crop: test/predict: sliding-window inference with square windows of this side (None: whole image).
        slide_stride: step between windows (None: two thirds of ``slide_crop``).
        num_log_images: validation images drawn as mask overlays to TensorBoard each epoch, with the
            confusion matrix (0 disables both).

        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (see ``BaseTask``).
    """

    monitor = "val/mIoU"
    mode = "max"
    eval_options = ("tta_flip", "tta_scales", "slide_crop", "slide_stride", "num_log_images")
    logged_metric_keys = ("PA", "MPA", "mIoU", "FWIoU")
    export_output_names = ("logits",)

    def __init__(
        self,
        num_classes: int = 21,
        model: SegmenterName = "deeplabv3plus",
        backbone: str = "resnet50",
        pretrained: bool = False,
        output_stride: Literal[8, 16, 32] = 16,
        feature_indices: list[int] | None = None,
        aspp_rates: list[int] | None = None,
        pool_scales: list[int] | None = None,
        head_channels: int = 256,
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        fcn_heads: Literal["mmseg", "torchvision"] | None = None,
        pretrained_weights: str | None = None,
        pretrained_class_rows: list[int] | None = None,
        reinit_class_head: bool = False,
        class_weights: list[float] | None = None,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        channels_last: bool = True,
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        tta_flip: bool = False,
        tta_scales: list[float] | None = None,
        slide_crop: int | None = None,
        slide_stride: int | None = None,
        num_log_images: int = 4,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """Sizes that disagree with ``num_classes``, an ``output_stride`` or ``ignore_index`` that cannot work."""
        n, ignore = args["num_classes"], args["ignore_index"]
        checks = [
            (args["output_stride"] in (8, 16, 32), f"output_stride must be 8, 16 or 32, got {args['output_stride']}"),
            *((args[k] is None or len(args[k]) == n, f"{k} has {len(args[k] or ())} entries for num_classes={n}")
              for k in ("class_weights", "class_names")),
            # masks hold unsigned ids; DataModules refuse it too (datamodules.segmentation.samples.check_ignore_index)
            (ignore >= 0, f"ignore_index={ignore}: masks store unsigned class ids (PNG, TFRecord), so no mask can hold "
                          "a negative value; use an id >= num_classes, e.g. 255"),
            (ignore < 0 or ignore >= n, f"ignore_index={ignore} must lie outside [0, num_classes={n})"),
        ]
        return super().argument_problems(args) + [message for ok, message in checks if not ok]

    # -- parts -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        published = published_weights(hp, "SemanticSegmentationTask", read_segmentation_weights)
        self.model = Segmenter(
            num_classes=hp.num_classes, model=hp.model, backbone=hp.backbone, pretrained=hp.pretrained,
            output_stride=hp.output_stride, feature_indices=tuple(hp.feature_indices or (1, 3, 4)), rates=hp.aspp_rates,
            pool_scales=tuple(hp.pool_scales or (1, 2, 3, 6)), head_channels=hp.head_channels, dropout=hp.dropout,
            aux_head=hp.aux_weight > 0, fcn_heads=hp.fcn_heads or "mmseg",
        )
        if published is not None:
            published.load_into(self.model, hp.pretrained_class_rows, hp.reinit_class_head)
        if hp.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def configure_losses(self) -> None:
        """Decode + weighted auxiliary cross entropy over the labelled pixels."""
        hp = self.hparams
        self.criterion = SegmentationCriterion(ignore_index=hp.ignore_index, class_weights=hp.class_weights,
                                               aux_weight=hp.aux_weight)

    def configure_metrics(self) -> None:
        """One dataset-wide confusion matrix per stage."""
        hp = self.hparams
        self.metrics = nn.ModuleDict({stage: SegmentationMetrics(hp.num_classes, hp.ignore_index) for stage in STAGES})

    def configure_callbacks(self) -> list[pl.Callback]:
        return [SegmentationImageLogger(num_images=self.num_log_images)] if self.num_log_images > 0 else []

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> ``(B, C, H, W)`` logits at the input size."""
        return self.model(images)

    def slide_logits(self, images: Tensor) -> Tensor:
        """Logits from overlapping ``slide_crop`` windows, averaged where they overlap (for large images)."""
        crop = int(self.slide_crop)
        stride = int(self.slide_stride or max(1, crop * 2 // 3))
        b, _, h, w = images.shape
        out = images.new_zeros((b, self.hparams.num_classes, h, w))
        count = images.new_zeros((1, 1, h, w))
        for y0, y1, x0, x1 in sliding_windows(h, w, crop, stride):
            out[:, :, y0:y1, x0:x1] += self(images[:, :, y0:y1, x0:x1]).float()
            count[:, :, y0:y1, x0:x1] += 1
        return out / count

    @torch.no_grad()
    def predict_probs(self, images: Tensor) -> Tensor:
        """Class probabilities ``(B, C, H, W)`` with the configured test-time options.

        Softmax outputs are averaged over ``tta_scales`` (each rescaled back to the input size) and, with
        ``tta_flip``, over horizontal flips; each pass uses sliding windows when ``slide_crop`` is set.
        """
        h, w = images.shape[-2:]
        scales = list(self.tta_scales or [1.0])
        flips = (False, True) if self.tta_flip else (False,)
        total = None
        for scale in scales:
            x = images
            if scale != 1.0:
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flip in flips:
                xi = x.flip(-1) if flip else x
                logits = self.slide_logits(xi) if self.slide_crop else self(xi)
                probs = logits.float().softmax(dim=1)
                if flip:
                    probs = probs.flip(-1)
                if scale != 1.0:
                    probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
                total = probs if total is None else total + probs
        return total / (len(scales) * len(flips))

    def each_image(self, fn: Callable[[Tensor], Tensor], batch: dict) -> Tensor:
        """``fn`` (images -> ``(n, C, h, w)`` maps) on every image of a padded batch at its own size.

        Images of the same size run together, no image sees padding: the image pooling of ASPP and the pyramid
        pooling of PSP average over the whole map, so padded batch-mates would change an image's prediction
        with the batch size and the loader order. Returns ``(B, C, H, W)``, zeros in the padding (whose mask
        pixels are ``ignore_index``).
        """
        images = batch["image"]
        b, _, h, w = images.shape
        sizes = [tuple(int(v) for v in size) for size in batch["size"]] if "size" in batch else [(h, w)] * b
        out = None
        for (hi, wi), index in group_by_size(sizes).items():
            maps = fn(images[index, :, :hi, :wi])
            if out is None:
                out = maps.new_zeros((b, maps.shape[1], h, w))
            out[index, :, :hi, :wi] = maps
        return out

    # -- steps -------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict, outputs: tuple[Tensor, Tensor | None] | None = None) -> dict[str, Tensor]:
        """``loss_decode`` and ``loss_aux`` (x ``aux_weight``); ``outputs``: ``(logits, auxiliary logits or None)``."""
        logits, aux = self.model.forward_with_aux(batch["image"]) if outputs is None else outputs
        return self.criterion(logits, aux, batch["mask"])

    def evaluation_step(self, batch: dict, stage: str, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Each image at its own size; validation: the plain network and the decode loss, test: the test-time
        options (flips, scales, windows), no loss."""
        if stage == "test":
            out = {"preds": self.each_image(self.predict_probs, batch).argmax(dim=1)}
        else:
            logits = self.each_image(self, batch)
            loss = self.log_loss(stage, self.compute_losses(batch, (logits, None)), batch["mask"].shape[0])
            out = {"loss": loss, "preds": logits.argmax(dim=1)}
        self.metrics[stage].update(out["preds"], batch["mask"])
        return out

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Per image: ``mask`` class ids ``(h, w)`` at the file's size (``orig_size``) and its ``path``.

        Probabilities are cropped to the image's pre-padding ``size`` and resized bilinearly to
        ``orig_size`` before the argmax, so the map matches the input file pixel for pixel.
        """
        probs = self.each_image(self.predict_probs, batch)
        n, full = probs.shape[0], list(probs.shape[-2:])
        sizes = batch.get("size", torch.tensor([full] * n))
        orig = batch.get("orig_size", sizes)
        paths = batch.get("path", [f"{batch_idx:06d}_{i:03d}.png" for i in range(n)])
        dtype = torch.uint8 if self.hparams.num_classes <= 256 else torch.int32
        out = []
        for i in range(probs.shape[0]):
            h, w = (int(v) for v in sizes[i])
            p = probs[i : i + 1, :, :h, :w]
            oh, ow = (int(v) for v in orig[i])
            if (oh, ow) != (h, w):
                p = F.interpolate(p, size=(oh, ow), mode="bilinear", align_corners=False)
            out.append({"mask": p[0].argmax(dim=0).to(dtype).cpu(), "path": paths[i]})
        return out

    # -- epoch ends ---------------------------------------------------------------------------------
    def log_stage_metrics(self, stage: str) -> dict[str, Tensor]:
        """PA, MPA, mIoU, FWIoU and the IoU of each class (``IoU/<class name>``)."""
        scores = super().log_stage_metrics(stage)
        self.log_metrics({f"IoU/{n}": iou for n, iou in zip(self.class_names(), scores["IoU"])}, stage)
        return scores

    def test_table(self, values: dict[str, Tensor]) -> str:
        """IoU and accuracy per class, then the summary scores."""
        return format_class_table(self.class_names(), values)

    def class_names(self) -> list[str]:
        """Class names for logs (ids when the DataModule gave none); spaces become underscores."""
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        return [str(n).replace(" ", "_") for n in names]

    # -- optimisation ---------------------------------------------------------------------------------
    def default_optimizer(self, params) -> torch.optim.Optimizer:
        """DeepLab / mmseg recipe: SGD, momentum 0.9, weight decay 5e-4 on every parameter (BaseTask's default rules):
        mmseg configs/_base_/schedules/schedule_20k.py L2 (the DeepLabV3+ VOC configs' schedule; 40k / 80k alike),
        ``optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005)`` with no ``paramwise_cfg``."""
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)

    def default_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """DeepLab's "poly" policy (DeepLabV3 §4.1): lr x (1 - step / total)^0.9, after the optional warm-up."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(self.warmup_steps(), total_steps))

    # -- export (tools/export.py) -------------------------------------------------------------------
    def export_module(self) -> torch.nn.Module:
        """For ``tools/export.py``: images ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, C, H, W)`` (argmax: the class
        map). Test-time flips, scales and sliding windows are not part of the exported network."""
        return self.model.eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[Tensor]:
        """Example input: ``(batch_size, 3, H, W)`` uniform images in [0, 1]; the exported file is fixed to ``size``
        (512 x 512 by default)."""
        return self.random_images(batch_size, size or (512, 512))
