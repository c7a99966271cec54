"""Semantic segmentation with dilated-convolution networks: DeepLabV3 / DeepLabV3+, PSPNet and FCN.

Method (Chen et al. 2017 "Rethinking Atrous Convolution", §3; Chen et al. 2018 "DeepLabV3+", §3; Zhao et al.
2017 "PSPNet", §3): a classification backbone whose last stages trade striding for atrous (dilated)
convolution, so features stay at 1/16 or 1/8 of the input (``output_stride``) with unchanged receptive
fields; a context head on the last stage (ASPP with image pooling, pyramid pooling, or plain convs); for
DeepLabV3+ a decoder that fuses the stride-4 features; bilinear upsampling of the logits to the input size.
Training minimises per-pixel cross entropy, plus 0.4 x the loss of an auxiliary FCN head on stage 3 (PSPNet
§3.3, as mmsegmentation's recipes do).

Batches are dicts: ``image`` float ``(B, 3, H, W)`` in [0, 1] (normalised here with ImageNet mean/std),
``mask`` int64 ``(B, H, W)`` with ``ignore_index`` for unlabelled pixels; for prediction also ``size``
``(B, 2)`` (the image before batch padding), ``orig_size`` ``(B, 2)`` (the file) and ``path``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_tasks.base import BaseTask
from lit_tasks.metrics.segmentation import SegmentationMetrics
from lit_tasks.models.aspp import DeepLabV3Head, DeepLabV3PlusHead, aspp_rates
from lit_tasks.models.backbone import build_backbone
from lit_tasks.models.fcn import FCNHead
from lit_tasks.models.psp import PSPHead

MODELS = ("deeplabv3plus", "deeplabv3", "pspnet", "fcn")
TEST_TIME_OPTIONS = ("tta_flip", "tta_scales", "slide_crop", "slide_stride")  # not saved in checkpoints
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None) -> Tensor:
    """Pixel cross entropy averaged over the labelled pixels only (weighted mean with class weights).

    ``logits`` ``(B, C, H, W)``, ``target`` ``(B, H, W)``. The normaliser is the number of pixels whose label
    is not ``ignore_index`` (or the sum of their class weights), so the loss scale does not depend on how much
    of a crop is padding or unlabelled. mmsegmentation's ``CrossEntropyLoss`` does *not* do this by default
    (``avg_non_ignore=False`` divides by every pixel). A batch with no labelled pixel gives 0, not NaN.
    """
    # Cross entropy in fp32 even under autocast: log-softmax of bf16 logits loses the small probabilities.
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    norm = weight[target[valid]].sum() if weight is not None else valid.sum()
    return total / norm.clamp_min(1e-12) if bool(valid.any()) else total * 0.0


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` windows of side ``crop`` every ``stride`` px covering the image; the last row and
    column are shifted back to end at the border, and a side shorter than ``crop`` gets one window."""
    def starts(size: int) -> list[int]:
        if size <= crop:
            return [0]
        n = math.ceil((size - crop) / stride) + 1
        return sorted({min(i * stride, size - crop) for i in range(n)})

    return [(y, min(y + crop, height), x, min(x + crop, width)) for y in starts(height) for x in starts(width)]


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
        class_weights: optional per-class cross-entropy weights (length ``num_classes``).
        ignore_index: mask label that is neither trained on nor scored.
        class_names: names for per-class logs; linked from the DataModule.
        channels_last: run convolutions in NHWC (about 1.5x faster for conv nets on CPU and tensor cores).
        lr, weight_decay: SGD recipe (momentum 0.9, poly decay with power 0.9) used when ``optimizer`` is None.
        warmup_steps: linear warm-up of the default schedule.
        tta_flip: test/predict (not saved in checkpoints, like the three options below): also run the horizontally flipped image and average the probabilities.
        tta_scales: test/predict: run these rescaled copies too and average (e.g. ``[0.75, 1.0, 1.25]``).
        slide_crop: test/predict: sliding-window inference with square windows of this side (None: whole image).
        slide_stride: step between windows (None: two thirds of ``slide_crop``).
        optimizer, lr_scheduler: injected callables (see ``BaseTask``).
    """

    monitor = "val/mIoU"
    mode = "max"

    def __init__(
        self,
        num_classes: int = 21,
        model: str = "deeplabv3plus",
        backbone: str = "resnet50",
        pretrained: bool = False,
        output_stride: int = 16,
        feature_indices: list[int] | None = None,
        aspp_rates: list[int] | None = None,
        pool_scales: list[int] | None = None,
        head_channels: int = 256,
        dropout: float = 0.1,
        aux_weight: float = 0.4,
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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for num_classes={num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries for num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} must lie outside [0, num_classes={num_classes})")
        super().__init__(optimizer, lr_scheduler)
        # Test-time options belong to the evaluation run, not to the trained model, so they stay out of the
        # checkpoint: `lit-tasks test --ckpt_path X` then takes them from the test config file too (the CLI
        # lets only command-line options override a checkpoint's hyperparameters).
        self.tta_flip = tta_flip
        self.tta_scales = list(tta_scales) if tta_scales else None
        self.slide_crop = slide_crop
        self.slide_stride = slide_stride
        for name in TEST_TIME_OPTIONS:
            self._hparams.pop(name, None)
            self._hparams_initial.pop(name, None)

    # -- parts -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        """Dilated timm backbone, the chosen head, the optional auxiliary head; normalisation buffers."""
        hp = self.hparams
        indices = tuple(hp.feature_indices or (1, 3, 4))
        if len(indices) != 3:
            raise ValueError(f"feature_indices must name 3 feature levels (skip, aux, last), got {list(indices)}")
        os_ = None if hp.output_stride == 32 else hp.output_stride
        self.backbone = build_backbone(hp.backbone, pretrained=hp.pretrained, out_indices=indices, output_stride=os_)
        low_ch, aux_ch, high_ch = self.backbone.feature_info.channels()
        c, width = hp.num_classes, hp.head_channels
        if hp.model in ("deeplabv3plus", "deeplabv3"):
            rates = tuple(hp.aspp_rates) if hp.aspp_rates else aspp_rates(hp.output_stride)
            if hp.model == "deeplabv3plus":
                self.head = DeepLabV3PlusHead(high_ch, low_ch, c, rates, width, dropout=hp.dropout)
            else:
                self.head = DeepLabV3Head(high_ch, c, rates, width, hp.dropout)
        elif hp.model == "pspnet":
            self.head = PSPHead(high_ch, c, tuple(hp.pool_scales or (1, 2, 3, 6)), 2 * width, hp.dropout)
        else:
            self.head = FCNHead(high_ch, c, width, num_convs=2, concat_input=True, dropout=hp.dropout)
        # PSPNet §3.3 / mmseg: one conv FCN head on stage 3, trained only (dropped at inference).
        self.aux_head = None
        if hp.aux_weight > 0:
            self.aux_head = FCNHead(aux_ch, c, width, num_convs=1, concat_input=False, dropout=hp.dropout)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if hp.channels_last:
            self.to(memory_format=torch.channels_last)

    def configure_losses(self) -> None:
        weights = self.hparams.class_weights
        self.register_buffer(
            "class_weights", torch.tensor(weights, dtype=torch.float32) if weights else None, persistent=False
        )

    def configure_metrics(self) -> None:
        self.val_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)
        self.test_metrics = SegmentationMetrics(self.hparams.num_classes, self.hparams.ignore_index)
        self.last_scores: dict[str, Tensor] = {}  # latest computed val/test scores, for callbacks

    # -- forward -----------------------------------------------------------------------------------
    def forward_logits(self, images: Tensor, with_aux: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(B, 3, H, W)`` [0, 1] images -> ``(B, C, H, W)`` logits (and the auxiliary logits if asked)."""
        x = (images - self.mean) / self.std
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        low, mid, high = self.backbone(x)
        logits = self.head(high, low) if self.hparams.model == "deeplabv3plus" else self.head(high)
        size = images.shape[-2:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        aux = None
        if with_aux and self.aux_head is not None:
            aux = F.interpolate(self.aux_head(mid), size=size, mode="bilinear", align_corners=False)
        return logits, aux

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images in [0, 1] -> ``(B, C, H, W)`` logits at the input size."""
        return self.forward_logits(images)[0]

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

    # -- steps -------------------------------------------------------------------------------------
    def compute_loss(self, logits: Tensor, aux: Tensor | None, masks: Tensor) -> dict[str, Tensor]:
        """``loss`` = decode CE + ``aux_weight`` x auxiliary CE, with the parts."""
        ii, w = self.hparams.ignore_index, self.class_weights
        losses = {"loss_decode": masked_cross_entropy(logits, masks, ii, w)}
        if aux is not None:
            losses["loss_aux"] = masked_cross_entropy(aux, masks, ii, w)
        losses["loss"] = losses["loss_decode"] + self.hparams.aux_weight * losses.get("loss_aux", 0.0)
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, masks = batch["image"], batch["mask"]
        logits, aux = self.forward_logits(images, with_aux=True)
        losses = self.compute_loss(logits, aux, masks)
        parts = {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(parts, batch_size=images.shape[0])
        self.log("train/loss", losses["loss"].detach(), batch_size=images.shape[0], prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        images, masks = batch["image"], batch["mask"]
        logits = self(images)
        loss = masked_cross_entropy(logits, masks, self.hparams.ignore_index, self.class_weights)
        preds = logits.argmax(dim=1)
        self.val_metrics.update(preds, masks)
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        return {"loss": loss, "preds": preds}

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        preds = self.predict_probs(batch["image"]).argmax(dim=1)
        self.test_metrics.update(preds, batch["mask"])
        return {"preds": preds}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Per image: ``mask`` class ids ``(h, w)`` at the file's size (``orig_size``) and its ``path``.

        Probabilities are cropped to the image's pre-padding ``size`` and resized bilinearly to
        ``orig_size`` before the argmax, so the map matches the input file pixel for pixel.
        """
        probs = self.predict_probs(batch["image"])
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
    def _log_scores(self, metric: SegmentationMetrics, prefix: str) -> dict[str, Tensor]:
        scores = metric.compute()  # collective under DDP: every rank calls it
        metric.reset()
        scalars = {k: scores[k].float() for k in ("PA", "MPA", "mIoU", "FWIoU")}
        names = self.class_names()
        for name, iou in zip(names, scores["IoU"].tolist()):
            scalars[f"IoU/{name}"] = torch.tensor(iou)
        self.log_metrics(scalars, prefix)
        self.last_scores = {k: v.detach().cpu() for k, v in scores.items()}
        return scores

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        scores = self._log_scores(self.test_metrics, "test")
        rank_zero_info(format_class_table(self.class_names(), scores))

    def class_names(self) -> list[str]:
        """Class names for logs (ids when the DataModule gave none); spaces become underscores."""
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        return [str(n).replace(" ", "_") for n in names]

    # -- optimisation ---------------------------------------------------------------------------------
    def default_optimizer(self, params) -> torch.optim.Optimizer:
        """DeepLab / mmseg recipe: SGD, momentum 0.9, weight decay 5e-4 (bias and norm weights excluded)."""
        return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.lr_scheduler is None:
            # DeepLab's "poly" policy (DeepLabV3 §4.1): lr x (1 - step / total)^0.9, after the optional warm-up.
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
            config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                config["optimizer"], poly_with_warmup(self.warmup_steps(), total)
            )
        return config


def poly_with_warmup(warmup_steps: int, total_steps: int, power: float = 0.9):
    """LR multiplier: linear warm-up, then ``(1 - progress)^power`` down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - min(1.0, progress)) ** power

    return factor


def format_class_table(names: list[str], scores: dict[str, Tensor]) -> str:
    """Plain-text table of per-class IoU and accuracy (in %) and the four summaries."""
    width = max([len("class"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    for name, iou, acc in zip(names, scores["IoU"].tolist(), scores["Acc"].tolist()):
        lines.append(f"{name:<{width}}  {100 * iou:7.2f}  {100 * acc:7.2f}")
    lines.append("-" * (width + 18))
    lines.append("  ".join(f"{k} {100 * float(scores[k]):.2f}" for k in ("PA", "MPA", "mIoU", "FWIoU")))
    return "\n".join(lines)
