"""DetectionTask with VFNet and DETR: configs through the CLI, checkpoints, DDP with a rank without objects, bf16,
DETR's batch independence and published-weights loading, the per-model recipes and option checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules import ShapesDetectionDataModule
from datamodules.detection.samples import DetectionDataset
from datamodules.synthetic.shapes_detection import ShapesSource, split_seed
from lit_tasks import DetectionTask
from lit_tasks.cli import run_cli as cli_main
from test_detection_task import CONFIGS, NO_DOWNLOAD, TINY, TINY_SHAPES

TINY_ARGS = {
    "vfnet": dict(backbone="resnet18", fpn_channels=32, head_convs=1),
    "detr": dict(backbone="resnet18", d_model=32, nheads=2, num_encoder_layers=1, num_decoder_layers=2,
                 dim_feedforward=64, num_queries=6),
    "fcos": dict(backbone="resnet18", fpn_channels=32, head_convs=1),
}


def tiny_task(model: str, **kwargs) -> DetectionTask:
    return DetectionTask(**{"num_classes": 5, "model": model, "warmup_steps": 0, "num_log_images": 0,
                            **TINY_ARGS[model], **kwargs})


def tiny_shapes(**kwargs) -> ShapesDetectionDataModule:
    return ShapesDetectionDataModule(**{"num_train": 8, "num_val": 4, "image_size": 64, "batch_size": 2,
                                        "num_workers": 0, **kwargs})


# -- configs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["vfnet", "detr"])
def test_shapes_config_fast_dev_run(model, tmp_path):
    cli = cli_main(["fit", f"--config={CONFIGS / f'{model}_shapes.yaml'}", "--trainer.fast_dev_run=true",
                    f"--trainer.default_root_dir={tmp_path}", *TINY[model], *TINY_SHAPES])
    assert cli.model.hparams.model == model and cli.model.hparams.num_classes == 5
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and "val/map" in metrics
    if model == "detr":  # the criterion's logged values that are not losses
        assert "train/class_error" in metrics and "train/cardinality_error" in metrics
        assert "train/loss_giou_0" in metrics  # an auxiliary decoder layer's loss
        # From scratch: trainable BatchNorm (frozen BN on random weights is dead), nothing frozen.
        assert cli.model.frozen() == (-1, False)
    else:
        assert "train/num_pos" in metrics


def test_centre_sampling_follows_the_model():
    """FCOS samples the centre region (mmdet ``center_sampling=True``, radius 1.5); VFNet's FCOS-target fallback does
    not (vfnet_r50_fpn_1x_coco.py ``center_sampling=False``), unless the option says so."""
    tiny = dict(num_classes=3, backbone="resnet10t", fpn_channels=16, head_convs=1, num_log_images=0)
    assert DetectionTask(model="vfnet", use_atss=False, **tiny).criterion.center_sampling_radius == 0.0
    assert DetectionTask(model="fcos", **tiny).criterion.center_sampling_radius == 1.5
    assert DetectionTask(model="vfnet", use_atss=False, center_sampling_radius=1.5,
                         **tiny).criterion.center_sampling_radius == 1.5


@pytest.mark.parametrize("model", ["vfnet", "detr"])
def test_coco_config_fast_dev_run(model, shapes_coco_root):
    cli = cli_main(["fit", f"--config={CONFIGS / f'{model}_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
                    "--trainer.fast_dev_run=true", "--data.init_args.image_size=64", "--data.init_args.num_workers=0",
                    "--data.init_args.batch_size=2", *TINY[model], *NO_DOWNLOAD])
    task, data = cli.model, cli.datamodule
    assert task.hparams.model == model and task.hparams.num_classes == 5
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert data.resize == "shorter" and data.max_size == 1333
    # the recipe's freezing, as the config states it: VFNet trains the BatchNorms' affine (mmdet norm_eval=True,
    # requires_grad=True), DETR freezes them whole
    assert task.frozen() == (1, "statistics" if model == "vfnet" else True)
    assert not task.model.backbone.conv1.weight.requires_grad
    assert task.model.backbone.layer2[0].bn1.weight.requires_grad == (model == "vfnet")
    groups = cli.trainer.optimizers[0].param_groups
    if model == "detr":
        assert data.preset == "detr" and isinstance(cli.trainer.optimizers[0], torch.optim.AdamW)
        assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([1e-5, 1e-4])  # backbone at 0.1x
        assert cli.trainer.gradient_clip_val == 0.1
    else:
        assert data.preset == "flip" and isinstance(cli.trainer.optimizers[0], torch.optim.SGD)
        # the 16-image LR for 2 images a step; biases at twice that (mmdet's bias_lr_mult=2)
        assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([0.01 * 2 / 16, 0.02 * 2 / 16])
        assert task.hparams.lr_drop_epochs == [8, 11] and task.hparams.lr_base_batch_size == 16


# -- checkpoints ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["vfnet", "detr"])
def test_checkpoint_round_trip(model, tmp_path):
    """Fit 2 steps, then validate --ckpt_path and load_from_checkpoint: the trained network, not a fresh one."""
    ckpt_dir = tmp_path / "ckpt"
    common = [f"--config={CONFIGS / f'{model}_shapes.yaml'}", *TINY[model], *TINY_SHAPES,
              f"--trainer.default_root_dir={tmp_path}", "--model.init_args.score_threshold=0.0",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    cli_main(["fit", *common, "--trainer.max_steps=2", "--trainer.max_epochs=1", f"--checkpoint.dirpath={ckpt_dir}"])
    ckpt = ckpt_dir / "last.ckpt"
    validated = cli_main(["validate", *common, f"--ckpt_path={ckpt}", "--model.max_detections=3"]).model
    assert validated.max_detections == 3
    loaded = DetectionTask.load_from_checkpoint(ckpt, score_threshold=0.0, max_detections=3)
    assert loaded.hparams.model == model
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    validated.eval(), loaded.eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = validated(images), loaded(images)
        fresh = tiny_task(model, score_threshold=0.0, max_detections=3).eval()(images)
    for pa, pb, pf in zip(a, b, fresh):
        assert 0 < len(pa["scores"]) <= 3
        for key in pa:
            assert torch.equal(pa[key], pb[key]), key
        assert not torch.equal(pa["scores"], pf["scores"])


# -- DDP: a process whose images have no objects ---------------------------------------------------------------

class RankSplitShapes(ShapesDetectionDataModule):
    """Shapes whose images on rank 1 have no object (each rank reads its own set: no distributed sampler)."""

    def build_dataset(self, split: str) -> DetectionDataset:
        empty = self.trainer is not None and self.trainer.global_rank == 1
        stream = "train" if split == "train" else "val"
        count = self.num_train if split == "train" else self.num_val
        source = ShapesSource(count, split_seed(self.seed, stream), self.image_size, 0 if empty else self.max_objects,
                              self.size_range)
        return DetectionDataset(source, self.transform(split))


class RecordBatches(pl.Callback):
    """Each rank writes the number of boxes it trained and validated on, and its final weights' checksum."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.boxes = {"train": 0, "val": 0}
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.boxes["train"] += sum(len(t["boxes"]) for t in batch[1])
        self.losses.append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.boxes["val"] += sum(len(t["boxes"]) for t in batch[1])

    def on_fit_end(self, trainer, pl_module) -> None:
        checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        record = {"boxes": self.boxes, "losses": self.losses, "checksum": checksum}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", [
    "vfnet", pytest.param("detr", marks=pytest.mark.slow), pytest.param("fcos", marks=pytest.mark.slow)])
def test_two_processes_fit_and_validate_with_a_rank_without_objects(model, tmp_path):
    """gloo, 2 processes: rank 1 trains and validates on images without objects. Every normaliser's all-reduce must be
    reached on both ranks (else gloo aborts or the run hangs), the weights stay equal (DDP), losses finite."""
    task = tiny_task(model)
    dm = RankSplitShapes(num_train=8, num_val=4, image_size=64, batch_size=2, num_workers=0)
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         use_distributed_sampler=False, num_sanity_val_steps=0, val_check_interval=2,
                         limit_val_batches=2, callbacks=[RecordBatches(str(tmp_path))])
    trainer.fit(task, dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["boxes"]["train"] > 0 and ranks[0]["boxes"]["val"] > 0
    assert ranks[1]["boxes"] == {"train": 0, "val": 0}
    assert all(math.isfinite(v) for r in ranks for v in r["losses"]) and len(ranks[1]["losses"]) == 3
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    # the validation inside the fit (after step 2) ran on both ranks, rank 1 without objects
    assert "val/map" in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics["val/loss"]))


# -- mixed precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["vfnet", "detr"])
def test_bf16_mixed_fit_has_finite_loss(model, tmp_path):
    trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1,
                         num_sanity_val_steps=0, val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(tiny_task(model), tiny_shapes())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


# -- DETR through the task --------------------------------------------------------------------------------------------

def test_detr_detections_do_not_depend_on_batch_mates():
    """An image alone and batched (zero-padded) with a larger image: the same detections (the task's forward pads)."""
    torch.manual_seed(0)
    task = tiny_task("detr", max_detections=4).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # BatchNorm parameters as a trained network has them: fresh, the residual branches are off
        # (timm zero-initialises each block's last BN) and zero padding stays exactly zero, which would hide leaks.
        for m in task.model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    small, large = torch.rand(3, 70, 90, generator=g), torch.rand(3, 128, 160, generator=g)
    with torch.no_grad():
        (alone,) = task([small])
        batched = task([small, large])[0]
        other = task([large])[0]
    assert len(alone["scores"]) == 4  # capped at max_detections from num_queries = 6
    assert torch.equal(alone["labels"], batched["labels"])
    torch.testing.assert_close(batched["scores"], alone["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(batched["boxes"], alone["boxes"], rtol=0, atol=1e-4 * 90)  # pixels of a 90-px side
    assert not torch.allclose(other["scores"], alone["scores"])  # a different image gives something else


def test_detr_loads_weights_converted_from_hugging_face(tmp_path):
    """Random HF DetrForObjectDetection -> tools/convert_detr.py -> pretrained_weights: the task holds those weights;
    the architecture is checked; the class head can be replaced; the checkpoint of a fit no longer needs the file."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    from test_detr_convert import _tool

    torch.manual_seed(0)
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="test_resnet.r160_in1k",
                                     use_pretrained_backbone=False, num_labels=3, d_model=32, encoder_layers=1,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)
    hf = transformers.DetrForObjectDetection(config)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    converted = _tool().main([str(tmp_path / "pytorch_model.bin"), str(tmp_path / "detr_lit.pt"),
                              "--backbone", "test_resnet.r160_in1k", "--nheads", "4"])
    saved = torch.load(converted, weights_only=True)["state_dict"]
    arch = dict(model="detr", backbone="test_resnet.r160_in1k", d_model=32, nheads=4, num_encoder_layers=1,
                num_decoder_layers=2, dim_feedforward=64, num_queries=5, warmup_steps=0, num_log_images=0)

    task = DetectionTask(num_classes=3, pretrained_weights=str(converted), **arch)
    own = task.model.state_dict()
    assert set(saved) <= set(own)
    for name, value in saved.items():
        assert torch.equal(own[name], value), name
    assert task.frozen() == (1, True)  # published weights: the recipe's freezing
    # The Hugging Face file directly gives the same network.
    direct = DetectionTask(num_classes=3, pretrained_weights=str(tmp_path / "pytorch_model.bin"), **arch)
    assert all(torch.equal(v, direct.model.state_dict()[k]) for k, v in own.items())

    with pytest.raises(ValueError, match="nheads=2"):  # no shape shows it: the converted file's record does
        DetectionTask(num_classes=3, pretrained_weights=str(converted), **{**arch, "nheads": 2})
    with pytest.raises(ValueError, match="reinit_class_head"):
        DetectionTask(num_classes=5, pretrained_weights=str(converted), **arch)
    five = DetectionTask(num_classes=5, pretrained_weights=str(converted), reinit_class_head=True, **arch)
    assert five.model.class_embed.weight.shape == (6, 32)
    assert torch.equal(five.model.bbox_embed.layers[0].weight, saved["bbox_embed.layers.0.weight"])
    rows = DetectionTask(num_classes=2, pretrained_weights=str(converted), pretrained_class_rows=[2, 0], **arch)
    torch.testing.assert_close(rows.model.class_embed.weight, saved["class_embed.weight"][[2, 0, 3]], rtol=0, atol=0)

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(five, ShapesDetectionDataModule(num_train=2, num_val=2, image_size=64, batch_size=2, num_workers=0))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    converted.unlink()
    reloaded = DetectionTask.load_from_checkpoint(tmp_path / "fit.ckpt")
    assert reloaded.hparams.pretrained_weights is None and reloaded.frozen() == (1, True)
    assert all(torch.equal(v, five.state_dict()[k]) for k, v in reloaded.state_dict().items())


# -- recipes, schedules and option checks -----------------------------------------------------------------------------

def test_each_model_gets_its_papers_optimizer_by_default():
    detr = tiny_task("detr", warmup_steps=None).configure_optimizers()["optimizer"]
    assert isinstance(detr, torch.optim.AdamW)
    # backbone and the rest, every parameter decayed (detr main.py's two param_dicts)
    assert sorted(g["initial_lr"] for g in detr.param_groups) == pytest.approx([1e-5, 1e-4])
    assert {g["weight_decay"] for g in detr.param_groups} == {1e-4}
    task = tiny_task("vfnet", warmup_steps=None)
    vfnet = task.configure_optimizers()["optimizer"]
    # mmdet's paramwise_cfg: biases at 2x the LR without decay (tests/test_param_groups.py checks every parameter)
    assert isinstance(vfnet, torch.optim.SGD) and {g["initial_lr"] for g in vfnet.param_groups} == {0.01, 0.02}
    assert task.warmup_steps() == 500 and tiny_task("detr", warmup_steps=None).warmup_steps() == 0
    assert len(tiny_task("vfnet", head_convs=None).model.head.cls_tower) == 3 * 3  # the paper's 3 convs
    assert len(tiny_task("fcos", head_convs=None).model.head.cls_tower) == 4 * 3  # FCOS: 4


def test_lr_drops_at_the_given_epochs(tmp_path):
    # 4 training images, batch 2: 2 steps an epoch; x0.1 from epoch 1 on (step 2), again from epoch 2 (step 4).
    task = tiny_task("vfnet", lr=0.02, lr_drop_epochs=[1, 2])
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()],
                         default_root_dir=tmp_path)
    trainer.fit(task, tiny_shapes(num_train=4))
    assert lrs == pytest.approx([0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002])


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="detr", d_model=30, nheads=4), "d_model"),
    (dict(model="detr", d_model=30, nheads=3), "multiple of 4"),
    (dict(model="detr", num_queries=0), "num_queries"),
    (dict(model="detr", dropout=1.0), "dropout"),
    (dict(model="detr", eos_coef=0.0), "eos_coef"),
    (dict(model="detr", cost_class=0.0, cost_bbox=0.0, cost_giou=0.0), "cost_class"),
    (dict(model="detr", pretrained_weights="/nowhere/detr.pth"), "pretrained_weights: no file"),
    (dict(model="fcos", pretrained_weights=__file__), "not a weights file"),
    (dict(model="fcos", points="corner"), "points must be"),
    (dict(model="fcos", score_threshold_on="cls"), "score_threshold_on"),
    (dict(model="detr", reinit_class_head=True), "reinit_class_head"),
    (dict(model="vfnet", head_convs=0), "head_convs"),
    (dict(model="vfnet", vfl_gamma=-1.0), "vfl_gamma"),
    (dict(model="vfnet", nms_threshold=0.0), "nms_threshold"),
    (dict(model="vfnet", max_detections=0), "max_detections"),
    (dict(model="vfnet", lr_drop_epochs=[8, 3]), "lr_drop_epochs"),
    (dict(model="vfnet", lr=0.0), "lr must be"),
    (dict(model="vfnet", lr_base_batch_size=0), "lr_base_batch_size"),
    (dict(model="vfnet", regress_ranges=[[0, 64]]), "regress_ranges"),
])
def test_bad_options_fail_naming_the_option(kwargs, match):
    options = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_task(options.pop("model"), **options)
