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
    import yaml

    # The recipe its header cites (mmdet fcos_r50_caffe_fpn_gn-head_1x_coco.py and its imprv child): ImageNet
    # weights, frozen stem + stage 1 and frozen BatchNorm, no gradient clipping; the test overrides only the download.
    config = yaml.safe_load((CONFIGS / "fcos_coco.yaml").read_text())
    options = config["model"]["init_args"]
    assert (options["pretrained"], options.get("frozen_stages"), options.get("frozen_bn")) == (True, 1, True)
    assert "gradient_clip_val" not in config["trainer"]
    cli = cli_main(["fit", f"--config={CONFIGS / 'fcos_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
                    "--trainer.fast_dev_run=true", "--data.init_args.image_size=64", "--data.init_args.num_workers=0",
                    "--data.init_args.batch_size=2", *TINY_MODEL, *NO_DOWNLOAD])
    assert cli.model.hparams.num_classes == 5
    assert cli.model.frozen() == (1, True) and not cli.model.model.backbone.conv1.weight.requires_grad
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
        with_pos, without = paper.compute_losses((images, target), out), none.compute_losses((images, target), out)
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
              "--data.init_args.image_size=64", "--data.init_args.num_workers=0", *TINY_MODEL, *NO_DOWNLOAD,
              "--model.init_args.score_threshold=0.0", "--trainer.logger=false",
              f"--trainer.callbacks.output_file={out}", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"])
    records = json.loads(out.read_text())
    assert records and {r["image_id"] for r in records} == {1, 2, 3, 4}
    assert {r["category_id"] for r in records} <= {1, 11, 21, 31, 41}  # dataset ids, not contiguous labels
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in records)
    with pytest.raises(FileExistsError):  # nothing the user has is overwritten
        cli_main(["predict", f"--config={CONFIGS / 'fcos_coco.yaml'}", f"--data.init_args.root={shapes_coco_root}",
                  "--data.init_args.image_size=64", "--data.init_args.num_workers=0", *TINY_MODEL, *NO_DOWNLOAD,
                  "--trainer.logger=false", f"--trainer.callbacks.output_file={out}",
                  f"--trainer.default_root_dir={tmp_path / 'second'}"])


def test_channels_last_backbone_gives_the_same_detections():
    """channels_last is a memory layout only: same weights, same raw outputs (the FCOS head follows the FPN's format)."""
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


class Found(torch.nn.Module):
    """A post-processor that returns the same detections for every image."""

    def __init__(self, detections: dict) -> None:
        super().__init__()
        self.detections = detections

    def forward(self, outputs, sizes):
        return [dict(self.detections) for _ in sizes]


def test_map_counts_objects_the_resize_erased_as_misses(tmp_path, capsys):
    """COCO mAP scores against the dataset's own boxes: a 3 x 3 px object of a 640 x 480 image resized to 64 px
    falls under 1 px^2 and leaves the training target, but a detector that misses it must still lose recall."""
    import json

    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (640, 480), (90, 120, 150)).save(tmp_path / "images" / "a.png")
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 300, 200], "area": 50000.0},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [600, 20, 3, 3], "area": 7.0}]
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 480, "width": 640}], "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    dm = COCODetectionDataModule(str(tmp_path), train_annotations="val.json", val_annotations="val.json",
                                 train_images="images", val_images="images", image_size=64, num_workers=0)
    task = tiny_task(num_classes=1, num_log_images=0, class_names=["thing"])
    # A detector that finds the large object exactly (input pixels: 640 -> 64 is a 0.1 scale) and nothing else.
    found = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    task.postprocess = Found(found)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    (metrics,) = trainer.validate(task, dm, verbose=False)
    # One of two objects found at precision 1: AP@0.5 = 51/101 on pycocotools' 101 recall points (1.0 if the
    # erased object were not counted); the small-area AP is 0 (the 7 px^2 object is the only small one).
    assert float(metrics["val/map_50"]) == pytest.approx(51 / 101, abs=1e-6)
    assert float(metrics["val/map_small"]) == 0.0 and float(metrics["val/map_large"]) == pytest.approx(1.0)
    assert float(metrics["val/AP/thing"]) == pytest.approx(float(metrics["val/map"]))  # per-class AP, logged by name
    capsys.readouterr()
    trainer.test(task, dm, verbose=False)
    printed = capsys.readouterr().out
    assert "COCO bbox evaluation" in printed and any(line.startswith("thing ") for line in printed.splitlines())


def test_frozen_stem_stage_and_batchnorm_do_not_change_during_fit(tmp_path):
    """frozen_stages=1 + frozen_bn (the recipe with pretrained weights): stem, layer1 and every BatchNorm statistic
    and affine stay as they were; the rest of the backbone trains."""
    task = tiny_task(frozen_stages=1, frozen_bn=True, num_log_images=0)
    backbone = task.model.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(task, tiny_shapes())
    after = backbone.state_dict()
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1.")) or ".bn" in k or "downsample.1" in k
              or k.endswith(("running_mean", "running_var"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [k for k in before if k.startswith(("layer2.", "layer3.", "layer4.")) and k.endswith("conv1.weight")]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)


def test_recipe_freezing_follows_pretrained(monkeypatch):
    """pretrained=True defaults to frozen BN + frozen stem/stage 1 (mmdet's FCOS recipe); from scratch nothing is
    frozen (a random network with fixed identity normalisation and zero-initialised last BNs cannot train)."""
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))  # no hub
    pretrained = tiny_task(pretrained=True)
    scratch = tiny_task()
    names = lambda t: {type(m).__name__ for m in t.model.backbone.modules()}  # noqa: E731
    assert {"FoldedConv2d", "FoldedFrozenBatchNorm2d"} <= names(pretrained) and "BatchNorm2d" not in names(pretrained)
    assert not pretrained.model.backbone.layer1[0].conv1.weight.requires_grad
    assert pretrained.model.backbone.layer2[0].conv1.weight.requires_grad
    assert not any("Frozen" in name for name in names(scratch))
    assert all(p.requires_grad for p in scratch.model.backbone.parameters())
