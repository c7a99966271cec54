"""DetectionTask end to end: every detection config through the CLI, checkpoint round trip, DDP, bf16."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from datamodules import COCODetectionDataModule, ShapesDetectionDataModule
from lit_tasks import DetectionTask
from lit_tasks.cli import run_cli as cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
TINY_MODEL = ["--model.init_args.backbone=resnet18", "--model.init_args.fpn_channels=32",
              "--model.init_args.head_convs=1"]
TINY_SHAPES = ["--data.init_args.num_train=4", "--data.init_args.num_val=2", "--data.init_args.image_size=64",
               "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]
TINY_DETR = ["--model.init_args.backbone=resnet18", "--model.init_args.d_model=32", "--model.init_args.nheads=2",
             "--model.init_args.num_encoder_layers=1", "--model.init_args.num_decoder_layers=2",
             "--model.init_args.dim_feedforward=64", "--model.init_args.num_queries=6"]
TINY = {"fcos": TINY_MODEL, "vfnet": TINY_MODEL, "detr": TINY_DETR}
# The COCO configs are the papers' recipes with ImageNet weights; tests never touch a hub.
NO_DOWNLOAD = ["--model.init_args.pretrained=false"]


def tiny_task(**kwargs) -> DetectionTask:
    args = dict(num_classes=5, backbone="resnet18", fpn_channels=32, head_convs=1, warmup_steps=0)
    return DetectionTask(**{**args, **kwargs})


def tiny_shapes(**kwargs) -> ShapesDetectionDataModule:
    args = dict(num_train=8, num_val=4, image_size=64, batch_size=2, num_workers=0)
    return ShapesDetectionDataModule(**{**args, **kwargs})


def test_every_detection_config_has_a_test():
    # fcos_tfrecord.yaml is run by tests/test_tfrecord_detection.py, the VFNet and DETR ones in
    # tests/test_detection_models_task.py
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {
        "fcos_shapes.yaml", "fcos_coco.yaml", "fcos_tfrecord.yaml", "vfnet_shapes.yaml", "vfnet_coco.yaml",
        "detr_shapes.yaml", "detr_coco.yaml"}


def test_fcos_shapes_config_fast_dev_run(tmp_path):
    cli = cli_main(["fit", f"--config={CONFIGS / 'fcos_shapes.yaml'}", "--trainer.fast_dev_run=true",
                    f"--trainer.default_root_dir={tmp_path}", *TINY_MODEL, *TINY_SHAPES])
    assert cli.model.hparams.num_classes == 5  # linked from the DataModule
    assert cli.model.hparams.class_names == ["circle", "square", "triangle", "star", "cross"]
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert "val/map" in cli.trainer.callback_metrics


def test_fcos_coco_config_fast_dev_run(shapes_coco_root):
    cli = cli_main(["fit", f"--config={CONFIGS / 'fcos_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
                    "--trainer.fast_dev_run=true", "--data.init_args.image_size=64", "--data.init_args.num_workers=0",
                    "--data.init_args.batch_size=2", *TINY_MODEL])
    assert cli.model.hparams.num_classes == 5
    # The recipe's LR is for 16 images per step; this run has 2 (one device): 0.01 * 2 / 16 (linear scaling rule).
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.01 * 2 / 16, rel=1e-12)
    assert cli.datamodule.resize == "shorter" and cli.datamodule.max_size == 1333
    # the first training image has no boxes and is in the first batch (shuffle off is not needed: finite loss
    # over any batch is what matters, and the empty image is covered by the datamodule tests)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_fit_help_documents_task_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", f"--config={CONFIGS / 'fcos_shapes.yaml'}", "--help"])
    out = capsys.readouterr().out
    for option in ("--model.box_loss", "--model.nms_threshold", "--data.image_size", "--data.num_train",
                   "--checkpoint.monitor", "--trainer.max_epochs"):
        assert option in out, option


def _fixed_batch() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_checkpoint_round_trip(tmp_path):
    # Fit 2 steps through the CLI, then validate --ckpt_path and load_from_checkpoint: same network, same output.
    ckpt_dir = tmp_path / "ckpt"
    common = [f"--config={CONFIGS / 'fcos_shapes.yaml'}", *TINY_MODEL, *TINY_SHAPES,
              f"--trainer.default_root_dir={tmp_path}", "--model.init_args.score_threshold=0.0",
              "--trainer.logger=false"]
    cli_main(["fit", *common, "--trainer.max_steps=2", "--trainer.max_epochs=1",
              f"--checkpoint.dirpath={ckpt_dir}", "--trainer.enable_progress_bar=false"])
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.exists()
    # Options typed on the command line win over the checkpoint's hyperparameters (LightningCLI alone would
    # silently put the checkpoint's values back); the architecture still comes from the checkpoint.
    validated = cli_main(["validate", *common, f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false",
                          "--model.init_args.lr=0.5", "--model.num_log_images=0"]).model
    assert validated.hparams.lr == 0.5 and validated.num_log_images == 0
    # Evaluation-time options are not part of the trained model: not in the checkpoint's hyperparameters.
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert "score_threshold" not in saved and "num_log_images" not in saved and saved["lr"] != 0.5
    loaded = DetectionTask.load_from_checkpoint(ckpt, score_threshold=0.0)
    assert loaded.hparams.num_classes == 5 and loaded.hparams.backbone == "resnet18"
    assert loaded.hparams.lr != 0.5 and loaded.num_log_images == 4
    validated.eval(), loaded.eval()
    images = _fixed_batch()
    sizes = [(64, 64)] * 2
    with torch.no_grad():
        a, b = validated(images), loaded(images)
        raw_a, raw_b = validated.model(images, sizes), loaded.model(images, sizes)
    assert torch.equal(raw_a.cls_logits, raw_b.cls_logits) and torch.equal(raw_a.ltrb, raw_b.ltrb)
    fresh = tiny_task(score_threshold=0.0).eval()
    with torch.no_grad():
        assert not torch.equal(fresh.model(images, sizes).cls_logits, raw_a.cls_logits)
    for pa, pb in zip(a, b):
        assert set(pa) == {"boxes", "scores", "labels"} and len(pa["boxes"]) > 0
        for key in pa:
            assert torch.equal(pa[key], pb[key]), key


def test_forward_accepts_list_of_differently_sized_images():
    task = tiny_task(score_threshold=0.0).eval()
    with torch.no_grad():
        preds = task([torch.rand(3, 50, 70), torch.rand(3, 64, 40)])
    assert len(preds) == 2
    for p, (h, w) in zip(preds, [(50, 70), (64, 40)]):
        assert p["boxes"].shape[1] == 4 and len(p["boxes"]) <= 100
        assert float(p["boxes"][:, 2].max()) <= w and float(p["boxes"][:, 3].max()) <= h  # clipped to the image
        assert bool((p["scores"][:-1] >= p["scores"][1:]).all()) or len(p["scores"]) < 2


def test_bf16_mixed_fit_has_finite_loss(tmp_path):
    trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(tiny_task(), tiny_shapes())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.timeout(300)
def test_ddp_two_processes_metrics_cover_whole_validation_set(tmp_path):
    # 2 CPU processes (gloo): fit one epoch (2 steps per process), validate at its end; the logged mAP must equal one process validating
    # the same weights over the whole validation set (per-process mAP would differ).
    dm = tiny_shapes(num_train=8, num_val=8, batch_size=2)
    task = tiny_task(score_threshold=0.0, nms_threshold=0.5)
    with torch.no_grad():  # start from boxes of a few strides, so that some predictions match the shapes
        task.model.head.bbox_pred.bias.fill_(2.0)
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0)
    trainer.fit(task, dm)
    ddp_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/map")}
    assert ddp_metrics, "no validation metrics came back from the DDP run"
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    (single_metrics,) = single.validate(task, tiny_shapes(num_train=8, num_val=8, batch_size=2))
    assert float(single_metrics["val/mar_100"]) > 0  # a non-trivial comparison
    for key, value in ddp_metrics.items():
        assert value == pytest.approx(float(single_metrics[key]), abs=1e-6), key
    # and the half of the set that one process sees gives a different answer
    half = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, limit_val_batches=2)
    (half_metrics,) = half.validate(task, tiny_shapes(num_train=8, num_val=8, batch_size=2))
    assert any(abs(float(half_metrics[k]) - v) > 1e-6 for k, v in ddp_metrics.items())


def test_unknown_models_fail_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        tiny_task(model="yolo")
    with pytest.raises(ValueError, match="box_loss"):
        tiny_task(box_loss="l1")
    with pytest.raises(ValueError, match="regress_ranges must be 5"):
        tiny_task(regress_ranges=[[-1, 64], [64, 1e8]])


def test_regress_ranges_reach_the_target_assignment():
    """A 40-px box: the paper's ranges put it on P3 (max distance 20 <= 64); ranges that start at 1000 leave
    no positive anywhere, so the box and centerness losses vanish and the class loss is all negatives."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    target = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])}]
    paper = tiny_task()
    none = tiny_task(regress_ranges=[[1000, 2000], [2000, 3000], [3000, 4000], [4000, 5000], [5000, 1e8]])
    none.load_state_dict(paper.state_dict())
    paper.eval()
    with torch.no_grad():
        out = paper.model(images, [(64, 64)])
        with_pos, without = paper.losses(out, target), none.losses(out, target)
    assert float(with_pos["loss_box"]) > 0 and float(with_pos["loss_centerness"]) > 0
    assert float(without["loss_box"]) == 0 and float(without["loss_centerness"]) == 0
    assert float(without["loss_cls"]) != pytest.approx(float(with_pos["loss_cls"]))


def test_coco_datamodule_label_mapping_available_for_predictions(shapes_coco_root):
    dm = COCODetectionDataModule(root=str(shapes_coco_root), image_size=64, num_workers=0)
    assert dm.num_classes == 5 and dm.label_to_category_id[3] == 31


def test_predict_writes_coco_results_with_category_ids(shapes_coco_root, tmp_path):
    import json

    out = tmp_path / "preds.json"
    cli_main(["predict", f"--config={CONFIGS / 'fcos_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
              "--data.init_args.image_size=64", "--data.init_args.num_workers=0", *TINY_MODEL,
              "--model.init_args.score_threshold=0.0", "--trainer.logger=false",
              f"--trainer.callbacks.output_file={out}", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"])
    records = json.loads(out.read_text())
    assert records and {r["image_id"] for r in records} == {1, 2, 3, 4}
    assert {r["category_id"] for r in records} <= {1, 11, 21, 31, 41}  # dataset ids, not contiguous labels
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in records)
    with pytest.raises(FileExistsError):  # nothing the user has is overwritten
        cli_main(["predict", f"--config={CONFIGS / 'fcos_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
                  "--data.init_args.image_size=64", "--data.init_args.num_workers=0", *TINY_MODEL,
                  "--trainer.logger=false", f"--trainer.callbacks.output_file={out}",
                  f"--trainer.default_root_dir={tmp_path / 'second'}"])


def test_channels_last_backbone_gives_the_same_detections():
    """channels_last is a memory layout only: same weights, same raw outputs; the GN head stays NCHW."""
    torch.manual_seed(0)
    a, b = tiny_task(channels_last=True).eval(), tiny_task(channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    assert a.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert a.model.head.cls_logits.weight.is_contiguous()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out_a, out_b = a.model(images, [(64, 96)] * 2), b.model(images, [(64, 96)] * 2)
    for name in ("cls_logits", "ltrb", "centerness"):
        assert torch.allclose(getattr(out_a, name), getattr(out_b, name), atol=1e-5), name
