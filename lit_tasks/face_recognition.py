"""Face recognition: learn an embedding with a margin softmax, evaluate open-set pair verification.

Method (ArcFace, Deng et al. CVPR 2019; insightface arcface_torch, REFERENCE §1):

1. insightface's IResNet (or MobileFaceNet, or a timm backbone under the same BN-Dropout-FC-BN head)
   maps a ``(B, 3, 112, 112)`` face in [0, 1] (normalised inside as ``(x - 0.5) / 0.5``) to a 512-d embedding.
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
   (:class:`lit_tasks.metrics.verification.VerificationMetric`). Several named sets (insightface's
   ``lfw``, ``cfp_fp``, ``agedb_30`` ``.bin`` files) are validated in one loop, one dataloader each, each
   with its own 10-fold result (``val/lfw/accuracy``, ``val/lfw/tar_at_far_1e-3``, ...); their mean is
   ``val/verification_accuracy``, the monitored metric (one unnamed set logs ``val/verification_accuracy``,
   ``val/auc``, ``val/tar_at_far_*`` directly).

Batches: training ``(images (B,3,S,S), labels (B,) int64 in [0, num_identities))``; validation / test a
dict with ``image_a``, ``image_b`` ``(B,3,S,S)``, ``same`` ``(B,)`` bool and ``index`` ``(B,)`` int64 (the
pair's position in its set; fold membership depends on it), from dataloader ``k`` for the k-th of
``verification_sets``; predict a dict with ``image`` and optionally ``name`` (list of str), or a plain tensor
of images.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_tasks.base import STAGES, BaseTask
from lit_tasks.callbacks.embeddings import EmbeddingProjector
from lit_tasks.losses.margin import MarginSoftmaxLoss, build_margin
from lit_tasks.losses.partial_fc import PartialFC
from lit_tasks.metrics.verification import VerificationMetric
from lit_tasks.models.face.convert import read_face_weights
from lit_tasks.models.face.embedding import NormalisedEmbedder, build_face_network
from lit_tasks.models.published import published_weights
from lit_tasks.run.lightning_seams import attached_trainer, grad_scale, ignore_in_ddp
from lit_tasks.schedules import warmup_poly


class FaceRecognitionTask(BaseTask):
    """Train a face embedding with a margin softmax (optionally Partial FC); verify on pairs.

    Args:
        num_identities: training identities (classes), linked from the DataModule.
        backbone: ``iresnet18|34|50|100|200`` (insightface's IResNet, the network of the published
            arcface_torch numbers), ``mbf`` / ``mbf_large`` (MobileFaceNet): names starting with ``iresnet`` or
            ``mbf`` are built from insightface's definitions; every other name is a timm model
            (``features_only``; its last stage feeds insightface's embedding head). One rule, no registry:
            :func:`lit_tasks.models.face.embedding.build_face_network`.
        image_size: input side S (112 for aligned faces); the FC is sized for it. Linked from the DataModule.
        output_stride: timm backbone stride; 16 gives insightface's 7x7 map at 112 px with a ResNet (the
            insightface networks have stride 16 by construction).
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
        warmup_steps: linear warm-up of the default schedule (arcface_torch's: warm-up, then linear decay to 0).
        warmup_fraction: instead of ``warmup_steps``, warm up over this fraction of the run's optimizer steps, a
            length every dataset size reaches (0.1 in ``arcface_folder.yaml``: arcface_torch's WebFace42M configs
            warm up for a tenth of the epochs, ``warmup_epoch = num_epoch // 10`` in ``wf42m_pfc03_32gpu_r100.py``).
        channels_last: channels-last backbone (faster on CPU).
        pretrained: timm backbone weights (needs the hub).
        pretrained_weights: a local insightface arcface_torch ``backbone.pth`` (IResNet-18 ... 200, MobileFaceNet;
            or its ``checkpoint_gpu_*.pt``, or a ``tools/convert_weights.py`` output) loaded into the embedding
            network when the task is built: ``backbone`` / ``embedding_size`` / ``image_size`` must be the file's (a
            difference is an error naming it), every key is matched both ways. The margin head's class centres
            are not in the file (they belong to the training identities): they start fresh. Checkpoints of a fit do
            not name the file.

        Evaluation-time (not saved in checkpoints: ``test --ckpt_path`` takes them from its own config):
        flip_test: fuse the embedding of the mirrored image at validation, test, predict and export time.
        num_log_images: validation faces shown with their embeddings in TensorBoard's projector each epoch
            (from the first set), with the ROC curve of every set (0 disables both).
        verification_sets: names of the validation / test sets, one per dataloader in this order (linked
            from the DataModule by the CLI: the ``.bin`` stems); None for one unnamed set.

        optimizer, lr_scheduler, lr_scheduler_interval: injected callables (see ``BaseTask``).
    """

    monitor = "val/verification_accuracy"
    mode = "max"
    eval_options = ("flip_test", "num_log_images", "verification_sets")
    # A named set's result entries logged under ``stage/<set>/`` and their short names.
    SET_KEYS = {"verification_accuracy": "accuracy", "verification_accuracy_std": "accuracy_std",
                "threshold": "threshold", "auc": "auc", "tar_at_far_1e-4": "tar_at_far_1e-4",
                "tar_at_far_1e-3": "tar_at_far_1e-3", "tar_at_far_1e-2": "tar_at_far_1e-2"}
    export_output_names = ("embeddings",)

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
        warmup_fraction: float = 0.0,
        channels_last: bool = True,
        pretrained: bool = False,
        pretrained_weights: str | None = None,
        flip_test: bool = True,
        num_log_images: int = 300,
        verification_sets: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args: dict[str, Any]) -> list[str]:
        """Fewer than two identities, repeated or empty verification set names, two warm-up lengths."""
        sets, fraction = args["verification_sets"], args["warmup_fraction"]
        checks = [
            (args["num_identities"] >= 2,
             f"num_identities={args['num_identities']}: a softmax over identities needs at least 2"),
            (sets is None or (bool(sets) and len(set(sets)) == len(sets)),
             f"verification_sets={sets!r}: give distinct names, one per dataloader"),
            (0.0 <= fraction < 1.0 and not (fraction and args["warmup_steps"]),
             f"warmup_fraction={fraction} must be in [0, 1) and warmup_steps={args['warmup_steps']} 0 with it (one "
             "warm-up length, in steps or as a fraction)"),
        ]
        return super().argument_problems(args) + [message for ok, message in checks if not ok]

    # -- parts -----------------------------------------------------------------------------------
    def configure_models(self) -> None:
        h = self.hparams
        published = published_weights(h, "FaceRecognitionTask", read_face_weights)
        self.model = build_face_network(
            h.backbone, image_size=h.image_size, embedding_size=h.embedding_size, dropout=h.dropout,
            output_stride=h.output_stride, channels_last=h.channels_last, pretrained=h.pretrained,
        )
        if published is not None:
            published.load_into(self.model)

    def configure_losses(self) -> None:
        """The margin softmax over the identities' centres (their ``(B, D)`` embeddings -> the mean loss)."""
        h = self.hparams
        margin = build_margin(h.margin, scale=h.scale, m1=h.m1, m2=h.m2, m3=h.m3, gradient=h.margin_gradient)
        if h.partial_fc:
            self.criterion: nn.Module = PartialFC(num_classes=h.num_identities, embedding_size=h.embedding_size,
                                                  margin=margin, sample_rate=h.sample_rate)
            # The shards differ per process: DDP must neither broadcast nor shape-check them.
            ignore_in_ddp(self, self.criterion.ddp_ignored_buffers("criterion."))
        else:
            self.criterion = MarginSoftmaxLoss(h.num_identities, h.embedding_size, margin)

    def configure_metrics(self) -> None:
        """One verification metric per set (dataloader), in the order of ``verification_sets``, per stage."""
        count = len(self.verification_sets or [None])
        self.metrics = nn.ModuleDict({stage: nn.ModuleList(VerificationMetric() for _ in range(count))
                                      for stage in STAGES})

    def configure_callbacks(self) -> list[pl.Callback]:
        return [EmbeddingProjector(max_images=self.num_log_images)] if self.num_log_images > 0 else []

    def setup(self, stage: str) -> None:
        """Partial FC: keep this process's shard of the centres."""
        if isinstance(self.criterion, PartialFC):
            self.criterion.reshard()  # the process group exists from here on

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the margin head was ``self.criterion`` hold it under ``head.``: renamed."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("head.")]:
            state["criterion." + key.removeprefix("head.")] = state.pop(key)

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

    # -- steps -----------------------------------------------------------------------------------
    def compute_losses(self, batch: tuple[torch.Tensor, torch.Tensor],
                       outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss_margin"}``: the margin softmax of the embeddings (``outputs``, else the network's) and labels."""
        images, labels = batch
        return {"loss_margin": self.criterion(self.model(images) if outputs is None else outputs, labels)}

    def evaluation_step(self, batch: dict[str, Any], stage: str, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """The flip-fused embeddings of both images of each pair into the metric of the dataloader's set."""
        metrics = self.metrics[stage]
        if dataloader_idx >= len(metrics):
            raise ValueError(f"verification dataloader {dataloader_idx} has no set: verification_sets="
                             f"{self.verification_sets!r} names {len(metrics)}; give one name per dataloader "
                             "(the CLI links the DataModule's verification_sets)")
        flip = self.embedder()
        embeddings_a, embeddings_b = flip(batch["image_a"]), flip(batch["image_b"])
        metrics[dataloader_idx].update(embeddings_a, embeddings_b, batch["same"], batch["index"])
        return {"embeddings_a": embeddings_a, "embeddings_b": embeddings_b}

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """``{"embeddings": (B, D) L2-normalised on CPU, "names": list[str] | None}``."""
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        names = batch.get("name") if isinstance(batch, dict) else None
        return {"embeddings": self.embedder()(images).cpu(), "names": list(names) if names is not None else None}

    # -- epoch ends ---------------------------------------------------------------------------------
    def log_stage_metrics(self, stage: str) -> dict[str, Any]:
        """Compute, log and keep each set's result; named sets under ``stage/<name>/`` and their mean accuracy.

        ``epoch_results[stage]`` holds the first set's full result (ROC curve included) with the mean accuracy as
        ``verification_accuracy`` and the set's name as ``set_name``; ``epoch_results[f"{stage}/{name}"]`` each
        named set's. Every process computes every set (the metric's DDP sync is a collective).
        """
        metrics = self.metrics[stage]
        if not self.verification_sets:
            values = self.log_epoch_metric(metrics[0], stage)
            self.epoch_results[stage]["set_name"] = None
            return values
        accuracies = []
        for name, metric in zip(self.verification_sets, metrics):
            values = self.log_epoch_metric(metric, f"{stage}/{name}", self.SET_KEYS)
            self.epoch_results[f"{stage}/{name}"]["set_name"] = name
            accuracies.append(float(values["verification_accuracy"]))
        mean = torch.tensor(sum(accuracies) / len(accuracies), dtype=torch.float64)
        self.log_metrics({"verification_accuracy": mean}, stage)
        first = self.epoch_results[f"{stage}/{self.verification_sets[0]}"]
        self.epoch_results[stage] = {**first, "verification_accuracy": mean, "set_name": self.verification_sets[0]}
        return self.epoch_results[stage]

    # -- optimisation -------------------------------------------------------------------------------
    def default_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """SGD(lr 0.1, momentum 0.9, wd 5e-4): arcface_torch's recipe (REFERENCE §1.5), over every parameter in one
        group (BaseTask's default rules): train_v2.py L91-93, ``torch.optim.SGD(params=[{"params":
        backbone.parameters()}, {"params": module_partial_fc.parameters()}], lr=cfg.lr, momentum=0.9,
        weight_decay=cfg.weight_decay)``: BatchNorm, PReLU and the centres decay like every weight. Partial FC's
        centres are updated with that group's hyperparameters."""
        h = self.hparams
        return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    def warmup_steps(self) -> int:
        """``warmup_steps``, or ``warmup_fraction`` of the run's optimizer steps (rounded)."""
        h = self.hparams
        return int(h.warmup_steps) or int(round(h.get("warmup_fraction", 0.0) * self.total_steps()))

    def default_scheduler(self, optimizer: torch.optim.Optimizer,
                          total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """arcface_torch's ``PolynomialLRWarmup`` (REFERENCE §1.5): linear warm-up over ``warmup_steps``, then linear
        decay (power 1) to 0 at the last step, stepped every optimizer step."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(self.warmup_steps(), total_steps, power=1.0))

    def configure_optimizers(self) -> Any:
        """BaseTask's, and with Partial FC its centres bound to the optimizer and stepped after each of its steps."""
        config = super().configure_optimizers()
        if isinstance(self.criterion, PartialFC):
            optimizer = config["optimizer"]
            self.criterion.bind_optimizer(optimizer)
            # After optimizer.step() only: a step the AMP GradScaler skips (inf / NaN gradients) never calls it.
            optimizer.register_step_post_hook(self._step_centres)
        return config

    def _step_centres(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Partial FC's lazy centre update with the hyperparameters (as scheduled now) of the first param group."""
        trainer = attached_trainer(self)
        self.criterion.step(optimizer.param_groups[0], grad_scale(trainer) if trainer is not None else 1.0)

    # -- export (tools/export.py) -------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """For ``tools/export.py``: images in [0, 1] -> L2-normalised embeddings (no margin head)."""
        return self.embedder().eval()

    def export_example(self, batch_size: int = 1, size: Sequence[int] | None = None) -> tuple[torch.Tensor]:
        """Example input for export: ``(batch_size, 3, S, S)`` uniform images in [0, 1] (S fixed: ``image_size``)."""
        side = self.hparams.image_size
        return self.random_images(batch_size, size, fixed=(side, side))
