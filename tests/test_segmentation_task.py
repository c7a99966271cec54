"""SemanticSegmentationTask: loss, test-time inference, training loop, checkpoints, prediction files, CLI configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from layouts import write_voc  # other test files import it from here
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.segmentation.folders import FolderSegmentationDataModule
from datamodules.synthetic.shapes_segmentation import ShapesSegmentationDataModule
from lit_tasks.callbacks.segmentation_images import class_palette, overlay_mask
from lit_tasks.callbacks.segmentation_writer import SegmentationPredictionWriter
from lit_tasks.losses.cross_entropy import masked_cross_entropy
from lit_tasks.ops.images import sliding_windows
from lit_tasks.segmentation import SemanticSegmentationTask

IGNORE = 255
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
TINY = {"backbone": "test_resnet", "head_channels": 16}


def tiny_task(**kwargs) -> SemanticSegmentationTask:
    torch.manual_seed(0)
    return SemanticSegmentationTask(**{"num_classes": 6, **TINY, **kwargs})


# -- loss --------------------------------------------------------------------------------------------
def test_cross_entropy_averages_over_labelled_pixels_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :3] = IGNORE
    logp = logits.log_softmax(1).permute(0, 2, 3, 1).reshape(-1, 4).double()
    t = target.reshape(-1)
    valid = t != IGNORE
    nll = -logp[valid.nonzero()[:, 0], t[valid]]
    assert float(masked_cross_entropy(logits, target, IGNORE)) == pytest.approx(float(nll.mean()), abs=1e-6)
    # mmseg's default (avg_non_ignore=False) divides by all pixels: smaller whenever pixels are ignored.
    assert float(nll.sum() / t.numel()) < float(nll.mean())
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    wv = w.double()[t[valid]]
    expected = float((wv * nll).sum() / wv.sum())
    assert float(masked_cross_entropy(logits, target, IGNORE, w)) == pytest.approx(expected, abs=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 4, 4), IGNORE), IGNORE)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_aux_loss_weight():
    task = tiny_task(aux_weight=0.4)
    logits, aux = torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8)
    masks = torch.randint(0, 6, (1, 8, 8))
    losses = task.criterion(logits, aux, masks)  # the auxiliary term comes weighted
    assert float(losses["loss_aux"]) == pytest.approx(0.4 * float(masked_cross_entropy(aux, masks, IGNORE)), abs=1e-6)
    assert float(task.total_loss(losses, "train")) == pytest.approx(float(losses["loss_decode"] + losses["loss_aux"]),
                                                                    abs=1e-6)
    assert tiny_task(aux_weight=0.0).model.aux_head is None


# -- test-time inference --------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, crop, stride", [(50, 37, 16, 10), (16, 16, 16, 5), (10, 40, 24, 16)])
def test_sliding_windows_cover_the_image_within_bounds(h, w, crop, stride):
    cover = torch.zeros(h, w, dtype=torch.long)
    for y0, y1, x0, x1 in sliding_windows(h, w, crop, stride):
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert y1 - y0 == min(crop, h) and x1 - x0 == min(crop, w)
        cover[y0:y1, x0:x1] += 1
    assert (cover > 0).all()


class PixelModel(torch.nn.Module):
    """A 1x1 conv: each pixel's logits depend only on that pixel, so windows cannot change the result."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_equals_whole_image_for_a_pixelwise_model():
    task = tiny_task(slide_crop=16, slide_stride=10).eval()
    pixel = PixelModel()
    task.forward = pixel.forward  # nn.Module.__call__ dispatches to the instance attribute
    x = torch.rand(2, 3, 41, 29)
    torch.testing.assert_close(task.slide_logits(x), pixel(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.predict_probs(x), pixel(x).softmax(1), rtol=1e-5, atol=1e-5)


def test_flip_tta_is_flip_equivariant_and_scales_keep_size():
    task = tiny_task(tta_flip=True).eval()
    x = torch.rand(1, 3, 33, 47)
    a = task.predict_probs(x)
    b = task.predict_probs(x.flip(-1)).flip(-1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # averaging x and its mirror is mirror-symmetric
    plain = tiny_task().eval()
    assert not torch.allclose(plain.predict_probs(x), plain.predict_probs(x.flip(-1)).flip(-1), atol=1e-4)
    ms = tiny_task(tta_scales=[0.5, 1.0, 1.5]).eval()
    probs = ms.predict_probs(x)
    assert probs.shape == (1, 6, 33, 47)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 33, 47), rtol=1e-5, atol=1e-5)
    single = tiny_task(tta_scales=[1.0]).eval()
    torch.testing.assert_close(single.predict_probs(x), single(x).softmax(1))


# -- pictures -------------------------------------------------------------------------------------------
def test_palette_is_voc_and_overlay_paints_class_colours():
    palette = class_palette(21)
    assert palette[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert palette[15] == (192, 128, 128)  # VOC "person"
    image = torch.zeros(3, 2, 2)
    mask = torch.tensor([[1, 2], [IGNORE, 15]])
    out = overlay_mask(image, mask, 21, alpha=1.0)
    assert out[:, 0, 0].tolist() == [128, 0, 0] and out[:, 1, 1].tolist() == [192, 128, 128]
    assert out[:, 1, 0].tolist() == [0, 0, 0]  # ignored pixel left as the image


# -- training loop, checkpoint, prediction ----------------------------------------------------------------
def write_folder_dataset(root: Path) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    sizes = [(40, 52), (37, 45), (50, 31), (44, 44)]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "predict").mkdir()
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(image).save(root / "predict" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 3, size=(h, w), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    return sizes


def test_fit_test_predict_and_checkpoint_round_trip(tmp_path):
    sizes = write_folder_dataset(tmp_path / "data")
    dm = FolderSegmentationDataModule(root=str(tmp_path / "data"), num_classes=3, val_fraction=0.5, crop_size=32,
                                      predict_dir=str(tmp_path / "data" / "predict"), batch_size=2, num_workers=0)  # fmt: skip
    task = SemanticSegmentationTask(num_classes=3, class_names=["a", "b c", "d"], tta_flip=True, num_log_images=2, **TINY)
    writer = SegmentationPredictionWriter(str(tmp_path / "pred"), overlay=True)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, callbacks=[writer],
                         num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, dm)
    assert {"val/mIoU", "val/PA", "val/MPA", "val/FWIoU", "val/IoU/b_c"} <= set(trainer.callback_metrics)
    val_pixels = sum(Image.open(p[1]).size[0] * Image.open(p[1]).size[1] for p in dm.split_pairs("val"))
    assert int(task.epoch_results["val"]["confmat"].sum()) == val_pixels  # every val pixel once, batch padding ignored
    results = trainer.test(task, dm, verbose=False)[0]
    assert 0.0 <= results["test/mIoU"] <= 1.0 and "test/IoU/a" in results
    # TensorBoard got the overlays and the confusion matrix.
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"val/masks (image | truth | prediction)", "val/confusion_matrix"}
    assert "test/mIoU" in events.Tags()["scalars"] and "val/IoU/b_c" in events.Tags()["scalars"]

    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    raw = torch.load(ckpt, weights_only=True)  # hyperparameters are primitives: safe loading works
    assert raw["hyper_parameters"]["class_names"] == ["a", "b c", "d"]
    loaded = SemanticSegmentationTask.load_from_checkpoint(ckpt).eval()
    task.eval()
    x = torch.rand(1, 3, 29, 35)
    torch.testing.assert_close(loaded(x), task(x))
    assert loaded.hparams.backbone == "test_resnet"
    # Test-time options are not part of the checkpoint: they are chosen when loading / testing.
    assert "tta_flip" not in raw["hyper_parameters"] and loaded.tta_flip is False
    assert SemanticSegmentationTask.load_from_checkpoint(ckpt, tta_flip=True, slide_crop=32).slide_crop == 32

    trainer.predict(task, dm, return_predictions=False)
    for i, (h, w) in enumerate(sizes):
        png = Image.open(tmp_path / "pred" / f"p{i}.png")
        assert png.size == (w, h) and png.mode == "L"
        assert np.asarray(png).max() < 3
        assert Image.open(tmp_path / "pred" / "overlay" / f"p{i}.jpg").size == (w, h)
    # Nothing is overwritten: a second prediction into the same folder is refused and leaves the files as they were.
    before = (tmp_path / "pred" / "p0.png").read_bytes()
    with pytest.raises(FileExistsError, match="already holds 4 PNG"):
        trainer.predict(task, dm, return_predictions=False)
    assert (tmp_path / "pred" / "p0.png").read_bytes() == before


def test_predicted_png_matches_argmax_at_original_size(tmp_path):
    """A prediction for a resized input is mapped back to the file's size before the argmax."""
    task = tiny_task().eval()
    image = torch.rand(1, 3, 24, 30)
    batch = {"image": F.pad(image, (0, 2, 0, 8)), "size": torch.tensor([[24, 30]]),
             "orig_size": torch.tensor([[48, 60]]), "path": ["x/y.png"]}  # fmt: skip
    out = task.predict_step(batch, 0)[0]
    probs = task.predict_probs(batch["image"])[:, :, :24, :30]
    expected = F.interpolate(probs, size=(48, 60), mode="bilinear", align_corners=False).argmax(1)[0]
    assert out["path"] == "x/y.png" and out["mask"].shape == (48, 60)
    assert torch.equal(out["mask"].long(), expected)


def test_training_reduces_loss_on_shapes():
    pl.seed_everything(0)
    dm = ShapesSegmentationDataModule(num_train=8, num_val=4, image_size=48, batch_size=8, num_workers=0, augment=False)
    task = SemanticSegmentationTask(num_classes=dm.num_classes, **TINY, aux_weight=0.0, lr=0.05)
    batch = next(iter(dm.train_dataloader()))
    opt = task.default_optimizer(task.param_groups())
    losses = []
    for _ in range(8):
        loss = task.total_loss(task.compute_losses(batch), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


# -- CLI -------------------------------------------------------------------------------------------------
def run_cli(args: list[str]):
    from lit_tasks.cli import run_cli as main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lit-tasks"])  # LightningCLI warns when pytest's own argv is present too
        return main(args)


def cli_overrides(tmp_path: Path) -> list[str]:
    return [
        "--model.init_args.backbone=test_resnet",
        "--model.init_args.head_channels=16",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.parametrize("config", ["deeplabv3plus_shapes.yaml", "deeplabv3plus_voc.yaml", "deeplabv3plus_folder.yaml"])
def test_config_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--data.init_args.crop_size=32"] if "shapes" not in config else ["--data.init_args.image_size=48"]
    if "voc" in config:
        write_voc(tmp_path / "voc")
        extra.append(f"--data.init_args.root={tmp_path / 'voc'}")
    if "folder" in config:
        write_folder_dataset(tmp_path / "folder")
        extra += [f"--data.init_args.root={tmp_path / 'folder'}", "--data.init_args.class_names_file=null",
                  "--data.init_args.num_classes=3", "--data.init_args.val_fraction=0.5"]  # fmt: skip
    run_cli(["fit", f"--config={CONFIGS / config}", "--trainer.fast_dev_run=true", *cli_overrides(tmp_path), *extra])


def test_cli_fit_then_test_and_predict_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = f"--config={CONFIGS / 'deeplabv3plus_shapes.yaml'}"
    data = ["--data.init_args.image_size=40", "--data.init_args.num_val=2", "--data.init_args.num_train=4"]
    run_cli(["fit", config, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", *data,
             *cli_overrides(tmp_path / "fit"), f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])  # fmt: skip
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    cli = run_cli(["test", config, f"--ckpt_path={ckpt}", *data, *cli_overrides(tmp_path / "test"),
                   "--model.init_args.tta_flip=true"])  # fmt: skip
    assert cli.model.tta_flip is True  # command-line test options survive the checkpoint's hyperparameters
    # The config's SegmentationPredictionWriter writes to predictions/deeplabv3plus_shapes (cwd = tmp_path).
    run_cli(["predict", config, f"--ckpt_path={ckpt}", *data, *cli_overrides(tmp_path / "predict")])
    out = tmp_path / "predictions" / "deeplabv3plus_shapes"
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == 2 and (out / "overlay" / pngs[0].replace(".png", ".jpg")).is_file()
    assert Image.open(out / pngs[0]).size == (40, 40)


def test_ignore_index_is_linked_from_the_datamodule(tmp_path, monkeypatch):
    """The DataModule's ignore_index reaches the task; the task's cannot be set apart from it on the CLI (a
    mismatch would die inside F.cross_entropy naming no option, or score unlabelled pixels as a class)."""
    monkeypatch.chdir(tmp_path)
    config = f"--config={CONFIGS / 'deeplabv3plus_shapes.yaml'}"
    data = ["--data.init_args.image_size=32", "--data.init_args.num_val=2", "--data.init_args.num_train=2",
            "--data.init_args.ignore_index=100"]
    cli = run_cli(["fit", config, "--trainer.fast_dev_run=true", *data, *cli_overrides(tmp_path)])
    assert cli.model.hparams.ignore_index == 100 and cli.model.metrics["val"].ignore_index == 100
    with pytest.raises(ValueError, match="ignore_index=7 .* differs from the DataModule's ignore_index=100"):
        run_cli(["fit", config, "--trainer.fast_dev_run=true", *data, *cli_overrides(tmp_path),
                 "--model.init_args.ignore_index=7"])


class CollectPredictions(pl.Callback):
    """Each validation image's prediction cropped to its own size, by path."""

    def __init__(self) -> None:
        self.preds: dict[str, torch.Tensor] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        for i, path in enumerate(batch["path"]):
            h, w = batch["size"][i].tolist()
            self.preds[path] = outputs["preds"][i, :h, :w].clone()


@pytest.mark.parametrize("model", ["deeplabv3plus", "pspnet"])
def test_predictions_do_not_depend_on_batch_mates(tmp_path, model):
    """ASPP's image pooling and PSP's pyramid pooling average over the whole map: with images padded to the largest
    of their batch, an image's prediction (and mIoU) changed with the batch size and the loader order."""
    write_folder_dataset(tmp_path / "data")  # 4 images of 4 different sizes
    task = tiny_task(num_classes=3, model=model, num_log_images=0).eval()
    with torch.no_grad():  # a head whose output depends on the pooled context strongly enough to show
        for p in task.model.head.parameters():
            p.mul_(5.0)
    results = {}
    for batch_size in (1, 4):
        dm = FolderSegmentationDataModule(root=str(tmp_path / "data"), num_classes=3, val_fraction=0.99,
                                          batch_size=batch_size, num_workers=0)
        collect = CollectPredictions()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[collect], default_root_dir=tmp_path)
        (metrics,) = trainer.validate(task, dm, verbose=False)
        results[batch_size] = (collect.preds, metrics)
    (one, m1), (four, m4) = results[1], results[4]
    assert sorted(one) == sorted(four) and len(one) == 4
    for path in one:
        assert torch.equal(one[path], four[path]), path
    assert m1["val/mIoU"] == m4["val/mIoU"]


@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_negative_ignore_index_is_refused_at_construction(tmp_path, ignore_index):
    """Masks hold unsigned class ids (PNG, TFRecord planes): a negative label can never be read from a mask file,
    and the uint8/uint16 mask path turned -1 into 255 and F.cross_entropy then raised an IndexError mid-fit."""
    write_folder_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}: .*unsigned"):
        tiny_task(num_classes=3, ignore_index=ignore_index)
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}: .*unsigned"):
        FolderSegmentationDataModule(root=str(tmp_path / "data"), num_classes=3, ignore_index=ignore_index)
    from datamodules import ShapesSegmentationDataModule

    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}: .*unsigned"):
        ShapesSegmentationDataModule(ignore_index=ignore_index)
