"""Face recognition: learn an embedding with a margin softmax, evaluate open-set pair verification.

Method (ArcFace, Deng et al. CVPR 2019; insightface arcface_torch, REFERENCE §1):

1. A timm backbone and the BN-Dropout-FC-BN head map a ``(B, 3, 112, 112)`` face in [0, 1] (normalised
   inside as ``(x - 0.5) / 0.5``) to a 512-d embedding.
2. Training treats every identity as a class: cosines between the L2-normalised embedding and the
   ``num_identities`` L2-normalised class centres go through a margin head (ArcFace / CosFace /
   SphereFace / combined) and cross entropy, in fp32 whatever the precision.
3. With ``partial_fc=True`` the centres are sharded across DDP processes and a ``sample_rate`` fraction
   of them is used per step (:mod:`lit_tasks.losses.partial_fc`). They are not Parameters: after each
   optimizer step, the sampled rows are updated lazily (row-sparse) by the optimizer's own rule with the
   hyperparameters of its first parameter group as scheduled at that step (``torch.optim.SGD`` with
   momentum / Nesterov / weight decay, as insightface; ``torch.optim.AdamW`` or ``Adam`` with their state
   kept per row, as the ViT recipes need; other optimizers are refused). A step the AMP GradScaler skips
   (inf / NaN gradients) never calls ``optimizer.step()``, so the centres skip it too. Centres and their
   optimizer state are saved whole in checkpoints, so a resumed run continues exactly.
4. Validation is verification on pairs of identities never seen in training: the flip-fused embedding
   ``normalize(f(x) + f(mirror x))``, the LFW 10-fold accuracy, TAR@FAR and ROC AUC
   (:class:`lit_tasks.metrics.verification.VerificationMetric`).

Batches: training ``(images (B,3,S,S), labels (B,) int64 in [0, num_identities))``; validation / test a
dict with ``image_a``, ``image_b`` ``(B,3,S,S)``, ``same`` ``(B,)`` bool and ``index`` ``(B,)`` int64 (the
pair's position in the pairs list; fold membership depends on it); predict a dict with ``image`` and
optionally ``name`` (list of str), or a plain tensor of images.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_tasks.base import BaseTask
from lit_tasks.callbacks.embeddings import EmbeddingProjector
from lit_tasks.losses.margin import MarginSoftmaxLoss, build_margin
from lit_tasks.losses.partial_fc import PartialFC
from lit_tasks.metrics.verification import VerificationMetric
from lit_tasks.models.embedding import EmbeddingNetwork, NormalisedEmbedder


class FaceRecognitionTask(BaseTask):
    """Train a face embedding with a margin softmax (optionally Partial FC); verify on pairs.

    Args:
        num_identities: training identities (classes), linked from the DataModule.
        backbone: timm model name (``features_only`` support); its last stage feeds the head.
        image_size: input side S (112 for aligned faces); the FC is sized for it.
        output_stride: backbone stride; 16 gives insightface's 7x7 map at 112 px with a ResNet.
        embedding_size: D (512 in insightface).
        dropout: dropout before the embedding FC.
        margin: ``"arcface"``, ``"cosface"``, ``"sphereface"``, ``"combined"`` or ``"softmax"``.
        scale: logit scale s.
        m1, m2, m3: override the preset margins of ``margin`` (target logit ``cos(m1 t + m2) - m3``).
        margin_gradient: ``"classic"`` (exact derivative) or ``"straight_through"`` (insightface now).
        partial_fc: shard the centres across processes and sample them (Partial FC).
        sample_rate: fraction of centres per step with ``partial_fc`` (positives always kept).
        lr, momentum, weight_decay: SGD of the default optimizer (insightface: 0.1, 0.9, 5e-4). With an
            injected optimizer they are unused: its own settings apply, to the Partial FC centres too.
        warmup_steps: linear warm-up of the default warm-up + cosine schedule.
        channels_last: channels-last backbone (faster on CPU).
        pretrained: timm backbone weights (needs the hub).

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        flip_test: fuse the embedding of the mirrored image at validation, test, predict and export time.
        num_log_images: validation faces shown with their embeddings in TensorBoard's projector each epoch,
            with the ROC curve (0 disables both).

        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (see ``BaseTask``).
    """

    monitor = "val/verification_accuracy"
    mode = "max"
    eval_options = ("flip_test", "num_log_images")

    def __init__(
        self,
        num_identities: int = 1000,
        backbone: str = "resnet18",
        image_size: int = 112,
        output_stride: int = 16,
        embedding_size: int = 512,
        dropout: float = 0.0,
        margin: str = "arcface",
        scale: float = 64.0,
        m1: float | None = None,
        m2: float | None = None,
        m3: float | None = None,
        margin_gradient: str = "classic",
        partial_fc: bool = False,
        sample_rate: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        channels_last: bool = True,
        pretrained: bool = False,
        flip_test: bool = True,
        num_log_images: int = 300,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        if num_identities < 2:
            raise ValueError(f"num_identities={num_identities}: a softmax over identities needs at least 2")
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    # -- parts -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        self.model = EmbeddingNetwork(
            h.backbone, h.image_size, h.embedding_size, h.dropout, h.output_stride, h.channels_last, h.pretrained
        )

    def configure_losses(self) -> None:
        h = self.hparams
        margin = build_margin(h.margin, h.scale, h.m1, h.m2, h.m3, h.margin_gradient)
        if h.partial_fc:
            self.head: nn.Module = PartialFC(h.num_identities, h.embedding_size, margin, h.sample_rate)
            # The shards differ per process: DDP must neither broadcast nor shape-check them.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, self.head.ddp_ignored_buffers("head.")
            )
        else:
            self.head = MarginSoftmaxLoss(h.num_identities, h.embedding_size, margin)

    def configure_metrics(self) -> None:
        self.val_verification = VerificationMetric()
        self.test_verification = VerificationMetric()

    def configure_callbacks(self) -> list[pl.Callback]:
        return [EmbeddingProjector(max_images=self.num_log_images)] if self.num_log_images > 0 else []

    def setup(self, stage: str) -> None:
        if isinstance(self.head, PartialFC):
            self.head.reshard()  # the process group exists from here on

    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """SGD(lr 0.1, momentum 0.9, wd 5e-4): arcface_torch's recipe (REFERENCE §1.5)."""
        h = self.hparams
        return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    # -- inference -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) embeddings ``(B, D)`` of ``(B, 3, S, S)`` images in [0, 1]."""
        return self.model(images)

    def embedder(self, flip: bool | None = None) -> NormalisedEmbedder:
        """The images -> L2-normalised embedding module (flip-fused unless ``flip=False``), for export."""
        return NormalisedEmbedder(self.model, self.flip_test if flip is None else flip)

    def embed(self, images: torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """L2-normalised ``(B, D)`` embeddings of ``(B, 3, S, S)`` images in [0, 1], in eval mode, no grad."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.embedder(flip)(images.to(self.device))
        finally:
            self.train(was_training)

    export_output_name = "embeddings"

    def export_module(self) -> nn.Module:
        """For ``tools/export.py``: images in [0, 1] -> L2-normalised embeddings (no margin head)."""
        return self.embedder().eval()

    def export_example(self, batch_size: int = 1) -> tuple[torch.Tensor]:
        """Example input for export: ``(batch_size, 3, S, S)`` uniform images in [0, 1]."""
        generator = torch.Generator().manual_seed(batch_size)
        size = self.hparams.image_size
        return (torch.rand(batch_size, 3, size, size, generator=generator),)

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.head(self.model(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if isinstance(self.head, PartialFC):
            optimizer = config["optimizer"]
            self.head.bind_optimizer(optimizer)
            # After optimizer.step() only: a step the AMP GradScaler skips (inf / NaN gradients) never calls it.
            optimizer.register_step_post_hook(self._step_centres)
        return config

    def _step_centres(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Partial FC's lazy centre update with the hyperparameters (as scheduled now) of the first param group."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.head.step(optimizer.param_groups[0], scale)

    def _verification_step(self, batch: dict[str, Any], metric: VerificationMetric) -> dict[str, torch.Tensor]:
        flip = self.embedder()
        embeddings_a, embeddings_b = flip(batch["image_a"]), flip(batch["image_b"])
        metric.update(embeddings_a, embeddings_b, batch["same"], batch["index"])
        return {"embeddings_a": embeddings_a, "embeddings_b": embeddings_b}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._verification_step(batch, self.val_verification)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._verification_step(batch, self.test_verification)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metric(self.val_verification, "val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metric(self.test_verification, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``{"embeddings": (B, D) L2-normalised on CPU, "names": list[str] | None}``."""
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        names = batch.get("name") if isinstance(batch, dict) else None
        return {"embeddings": self.embedder()(images).cpu(), "names": list(names) if names is not None else None}
