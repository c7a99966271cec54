"""PoseTask end to end: configs through the CLI, checkpoints, predict json, DDP, bf16, flip test, export, schedule,
detector boxes with OKS NMS; metrics through the task against pycocotools on the written results."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from datamodules import COCOKeypointDataModule, FiguresKeypointDataModule
from datamodules.synthetic.figures import FIGURE_OKS_SIGMAS, write_figures_coco
from lit_tasks import PoseTask
from lit_tasks.cli import run_cli
from lit_tasks.models.pose.rle import flip_back_normalized, pixels_to_normalized

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pose"
K = 13
FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11]
TINY_MODEL = ["--model.init_args.backbone=test_resnet", "--model.init_args.num_log_images=0"]


@pytest.fixture(scope="module")
def figures_root(tmp_path_factory) -> Path:
    """The figures DataModule's layout for num_train=6, num_val=5, image_size=64, seed 0."""
    root = tmp_path_factory.mktemp("figures")
    write_figures_coco(root, {"train2017": (6, 0), "val2017": (5, 1)}, image_size=64)
    return root


def tiny_data(root: Path, **kwargs) -> list[str]:
    args = {"root": str(root), "num_train": 6, "num_val": 5, "image_size": 64, "input_size": "[32, 24]",
            "batch_size": 2, "num_workers": 0, **kwargs}
    return [f"--data.init_args.{k}={v}" for k, v in args.items()]


def figures_dm(root: Path, **kwargs) -> FiguresKeypointDataModule:
    args = dict(root=str(root), num_train=6, num_val=5, image_size=64, input_size=[32, 24], batch_size=2,
                num_workers=0)
    return FiguresKeypointDataModule(**{**args, **kwargs})


def tiny_task(**kwargs) -> PoseTask:
    torch.manual_seed(0)
    args = dict(num_keypoints=K, backbone="test_resnet", input_size=[32, 24], flip_index=FLIP,
                oks_sigmas=list(FIGURE_OKS_SIGMAS), skeleton=[[0, 1], [1, 3]], num_log_images=0)
    return PoseTask(**{**args, **kwargs})


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**args, **kwargs})


class OracleRegressor(nn.Module):
    """Stands in for the network: looks each crop up (by its pixels, also mirrored) and returns its ground truth
    plus seeded noise, with seeded sigmas, so the metrics have something non-trivial to score."""

    def __init__(self, dataset, noise: float = 0.03, seed: int = 0) -> None:
        super().__init__()
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        g = torch.Generator().manual_seed(seed)
        for i in range(len(dataset)):
            s = dataset[i]
            h, w = s["image"].shape[-2:]
            coords = pixels_to_normalized(s["keypoints"][:, :2], (h, w)) + noise * torch.randn(K, 2, generator=g)
            sigma = 0.05 + 0.4 * torch.rand(K, 2, generator=g)
            self.table[self.key(s["image"])] = (coords, sigma)
            mirrored = flip_back_normalized(coords[None], FLIP, w)[0]  # the mirror is an involution
            self.table[self.key(s["image"].flip(-1))] = (mirrored, sigma[FLIP])

    @staticmethod
    def key(image: torch.Tensor) -> str:
        return hashlib.md5(image.float().contiguous().numpy().tobytes()).hexdigest()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        found = [self.table[self.key(im)] for im in images]
        return {"coords": torch.stack([c for c, _ in found]), "sigma": torch.stack([s for _, s in found])}


def oracle_task(dm, **kwargs) -> PoseTask:
    task = tiny_task(**kwargs)
    task.model = OracleRegressor(dm.dataset("val"))
    return task


def pycocotools_stats(gt_file: Path, results: list[dict], sigmas) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


# -- configs through the CLI ------------------------------------------------------------------------------------
def test_every_pose_config_has_a_test():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {"rle_shapes.yaml", "rle_coco.yaml"}


def test_rle_shapes_config_fast_dev_run(figures_root, tmp_path):
    cli = run_cli(["fit", f"--config={CONFIGS / 'rle_shapes.yaml'}", "--trainer.fast_dev_run=true",
                   f"--trainer.default_root_dir={tmp_path}", *TINY_MODEL, *tiny_data(figures_root)])
    hp = cli.model.hparams
    assert hp.num_keypoints == K and hp.flip_index == FLIP and hp.oks_sigmas == list(FIGURE_OKS_SIGMAS)
    assert hp.input_size == [32, 24] and hp.keypoint_names[1] == "left_shoulder" and [0, 1] in hp.skeleton
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert {"val/map", "val/PCK", "val/AUC", "val/EPE"} <= set(cli.trainer.callback_metrics)


def test_rle_coco_config_fast_dev_run(figures_root, tmp_path):
    # Any COCO-format keypoint dataset: the figures' layout read by COCOKeypointDataModule, 13 sigmas given.
    cli = run_cli(["fit", f"--config={CONFIGS / 'rle_coco.yaml'}", "--trainer.fast_dev_run=true",
                   f"--data.init_args.root={figures_root}", "--data.init_args.input_size=[32, 24]",
                   "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
                   f"--data.init_args.oks_sigmas={list(FIGURE_OKS_SIGMAS)}", f"--trainer.default_root_dir={tmp_path}",
                   *TINY_MODEL])
    assert cli.model.hparams.num_keypoints == K and cli.model.hparams.flip_index == FLIP
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert "val/map" in cli.trainer.callback_metrics


def test_a_task_value_that_differs_from_the_data_is_refused(figures_root, tmp_path):
    with pytest.raises(ValueError, match="input_size"):
        run_cli(["fit", f"--config={CONFIGS / 'rle_shapes.yaml'}", "--trainer.fast_dev_run=true",
                 "--model.init_args.input_size=[64, 48]", *TINY_MODEL, *tiny_data(figures_root)])


# -- checkpoints, predict, export ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_predict_json(figures_root, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    common = [f"--config={CONFIGS / 'rle_shapes.yaml'}", *TINY_MODEL, *tiny_data(figures_root),
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    run_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.max_epochs=1", f"--checkpoint.dirpath={ckpt_dir}"])
    ckpt = ckpt_dir / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]  # primitives only
    assert saved["flip_index"] == FLIP and "flip_test" not in saved and "num_log_images" not in saved
    assert any(k.startswith("criterion.flow.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    validated = run_cli(["validate", *common, f"--ckpt_path={ckpt}", "--model.flip_test=false"]).model
    assert validated.flip_test is False
    loaded = PoseTask.load_from_checkpoint(ckpt).eval()
    assert loaded.flip_test is True and loaded.hparams.num_keypoints == K
    crops = torch.rand(3, 3, 32, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        keypoints, scores = loaded(crops)
        validated.eval().flip_test = True
        ref_k, ref_s = validated(crops)
        fresh_k, _ = tiny_task().eval()(crops)
    assert keypoints.shape == (3, K, 2) and scores.shape == (3, K)
    assert bool(((scores > 0) & (scores < 1)).all())
    assert torch.equal(keypoints, ref_k) and torch.equal(scores, ref_s)
    assert not torch.allclose(keypoints, fresh_k)

    out = tmp_path / "preds" / "keypoints.json"
    predict = ["predict", *common, f"--ckpt_path={ckpt}", f"--trainer.callbacks.output_file={out}"]
    run_cli(predict)
    records = json.loads(out.read_text())
    gt_file = figures_root / "annotations" / "person_keypoints_val2017.json"
    gt = json.loads(gt_file.read_text())
    labelled = [a for a in gt["annotations"] if not a["iscrowd"] and any(a["keypoints"][2::3])]
    assert len(records) == len(labelled)
    assert {r["category_id"] for r in records} == {1} and all(len(r["keypoints"]) == 3 * K for r in records)
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        res = coco.loadRes(str(out))
    assert len(res.getAnnIds()) == len(records)
    # keypoints are in image pixels: near their person's box, not in the 24 x 32 crop's frame
    boxes = {a["image_id"]: a["bbox"] for a in labelled}
    assert max(r["keypoints"][0] for r in records) > 24 or max(b[0] for b in boxes.values()) < 24
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        run_cli(predict)
    assert json.loads(out.read_text()) == records


def test_validation_ap_equals_pycocotools_on_the_predicted_json(figures_root, tmp_path):
    """val/map etc. (KeypointAP inside the task, GT carried in batches) == pycocotools evaluating the predict
    json against the annotation file: the whole path from crops to image pixels to COCO results."""
    dm = figures_dm(figures_root)
    task = oracle_task(dm)
    (metrics,) = trainer(tmp_path).validate(task, dm, verbose=False)
    assert 0.05 < metrics["val/map"] < 0.999 and metrics["val/PCK"] > 0.3
    from lit_tasks.callbacks.pose_writer import COCOKeypointResultsWriter

    out = tmp_path / "kp.json"
    trainer(tmp_path, callbacks=[COCOKeypointResultsWriter(str(out))]).predict(task, dm)
    stats = pycocotools_stats(figures_root / "annotations" / "person_keypoints_val2017.json",
                              json.loads(out.read_text()), FIGURE_OKS_SIGMAS)
    for key, index in (("val/map", 0), ("val/map_50", 1), ("val/map_75", 2), ("val/mar", 5)):
        assert metrics[key] == pytest.approx(stats[index], abs=1e-4), key


def test_test_prints_the_pycocotools_keypoint_summary(figures_root, tmp_path, capsys):
    dm = figures_dm(figures_root)
    (metrics,) = trainer(tmp_path).test(oracle_task(dm), dm, verbose=False)
    out = capsys.readouterr().out
    assert out.count("maxDets= 20") == 10 and "area=medium" in out and "PCK@0.05" in out
    assert f"{metrics['test/map']:.3f}" in out.split("\n")[1]


def test_detector_boxes_are_deduplicated_by_oks_nms(figures_root, tmp_path):
    """Every GT person detected twice with the same box: OKS NMS (0.9) removes the copies, so the AP equals that of
    the single detections; without NMS the copies are false positives ranked between the other people."""
    gt = json.loads((figures_root / "annotations" / "person_keypoints_val2017.json").read_text())
    people = [a for a in gt["annotations"] if any(a["keypoints"][2::3])]
    det = lambda a, s: {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": s}  # noqa: E731
    (tmp_path / "once.json").write_text(json.dumps([det(a, 3.0 * (j + 1)) for j, a in enumerate(people)]))
    (tmp_path / "twice.json").write_text(json.dumps([det(a, 3.0 * (j + 1) - d) for j, a in enumerate(people)
                                                     for d in (0.0, 0.001)]))
    dm = lambda name: COCOKeypointDataModule(root=str(figures_root), input_size=[32, 24], batch_size=2,  # noqa: E731
                                             num_workers=0, oks_sigmas=list(FIGURE_OKS_SIGMAS),
                                             val_detections=str(tmp_path / name))
    task = oracle_task(figures_dm(figures_root))
    assert len(dm("twice.json").dataset("val")) == 2 * len(dm("once.json").dataset("val")) == 2 * len(people)
    (once,) = trainer(tmp_path).validate(task, dm("once.json"), verbose=False)
    (with_nms,) = trainer(tmp_path).validate(task, dm("twice.json"), verbose=False)
    assert with_nms["val/map"] == pytest.approx(once["val/map"], abs=1e-12) and once["val/map"] > 0.05
    task.metrics["val"]["ap"].oks_nms_threshold = None
    (without,) = trainer(tmp_path).validate(task, dm("twice.json"), verbose=False)
    assert without["val/map"] < once["val/map"] - 0.05


def test_export_numeric_check(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    task = tiny_task().eval()
    report = tool.export(task, tmp_path, atol=1e-4)
    crops = task.export_example(5)[0]
    with torch.no_grad():
        keypoints, scores = task(crops)
    expected = torch.cat([keypoints, scores[..., None]], dim=-1).numpy()
    np.testing.assert_allclose(tool.run_exported("onnx", report["onnx"]["path"], (crops,)), expected, atol=1e-4)
    np.testing.assert_allclose(tool.run_exported("torchscript", report["torchscript"]["path"], (crops,)), expected,
                               atol=1e-5)
    real = tool.run_exported
    monkeypatch.setattr(tool, "run_exported", lambda fmt, path, inputs: real(fmt, path, inputs) + 1e-3)
    with pytest.raises(ValueError, match="differs from PyTorch by 0.001"):
        tool.export(task, tmp_path / "again", formats=["torchscript"], atol=1e-4)


# -- inference -------------------------------------------------------------------------------------------------
def test_flip_test_is_mirror_consistent_and_the_average():
    """With the flip test, predicting the mirrored crop and mirroring back gives the same keypoints (x -> W - 1 - x
    with the left/right swap), which a wrong shift or permutation breaks; it is the mean of the two passes."""
    task = tiny_task().eval()
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        k, s = task(x)
        km, sm = task(x.flip(-1))
        task.flip_test = False
        k0, s0 = task(x)
        kf, sf = task(x.flip(-1))
    mirrored = km[:, FLIP].clone()
    mirrored[..., 0] = 24 - 1 - mirrored[..., 0]
    torch.testing.assert_close(mirrored, k, atol=1e-4, rtol=0)
    torch.testing.assert_close(sm[:, FLIP], s, atol=1e-6, rtol=0)
    back = kf[:, FLIP].clone()
    back[..., 0] = 24 - 1 - back[..., 0]
    torch.testing.assert_close(k, (k0 + back) / 2, atol=1e-4, rtol=0)
    torch.testing.assert_close(s, (s0 + sf[:, FLIP]) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(k0, back, atol=1e-3)  # the two passes differ: the average is not trivial


def test_crop_to_image_helper_on_the_task():
    task = tiny_task()
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    # a 30 x 60 box at the 24:32 aspect ratio -> 45 x 60, x 1.25 -> 56.25 x 75 region: 75 / 32 px per crop px
    out = task.crop_to_image(torch.tensor([[[0.0, 0.0], [12.0, 16.0]]]), boxes)
    torch.testing.assert_close(out[0, 1], torch.tensor([25.0, 50.0]))  # the crop centre is the box centre
    torch.testing.assert_close(out[0, 0], torch.tensor([25.0 - 12 * 75 / 32, 50.0 - 16 * 75 / 32]))


# -- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["rle", "l1"])
def test_bf16_mixed_fit_is_finite(figures_root, tmp_path, loss):
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=2, precision="bf16-mixed", limit_val_batches=1,
                num_sanity_val_steps=0)
    t.fit(tiny_task(loss=loss), figures_dm(figures_root))
    assert math.isfinite(float(t.callback_metrics["train/loss"]))
    assert math.isfinite(float(t.callback_metrics["val/loss"]))


def test_optimizer_holds_the_flow_and_the_lr_steps_at_epoch_milestones(figures_root, tmp_path):
    task = tiny_task(lr_drop_epochs=[1, 2], lr=0.01)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    dm = figures_dm(figures_root, batch_size=4)
    t = trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[Record()])
    t.fit(task, dm)
    optimizer = t.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in task.criterion.flow.parameters()} <= held and len(held) == len(list(task.parameters()))
    assert seen == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_loss_is_masked_by_visibility_and_l1_is_the_baseline():
    task = tiny_task(loss="l1")
    out = {"coords": torch.zeros(1, K, 2), "sigma": torch.full((1, K, 2), 0.5)}
    kp = torch.zeros(1, K, 3)
    kp[0, 0] = torch.tensor([12.0 + 2.4, 16.0, 2])  # 0.1 of the width right of the centre
    kp[0, 1] = torch.tensor([100.0, 100.0, 0])  # unlabelled: ignored
    losses = task.compute_losses({"image": torch.zeros(1, 3, 32, 24), "keypoints": kp}, out)
    assert set(losses) == {"loss_l1"} and float(losses["loss_l1"]) == pytest.approx(0.1, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="flip_index is needed for 5 keypoints"):
        PoseTask(num_keypoints=5, oks_sigmas=[0.1] * 5)
    with pytest.raises(ValueError, match="oks_sigmas are needed for 5"):
        PoseTask(num_keypoints=5, flip_index=list(range(5)))
    with pytest.raises(ValueError, match="not a permutation"):
        tiny_task(flip_index=[0] * K)
    with pytest.raises(ValueError, match="loss must be"):
        tiny_task(loss="mse")
    task = PoseTask(backbone="test_resnet")  # 17 keypoints: COCO's flip index and sigmas
    assert task.keypoint_flip_index[:3] == [0, 2, 1] and len(task.sigmas) == 17


# -- distributed -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_two_process_validation_equals_one_process_with_an_uneven_split(figures_root, tmp_path):
    dm = figures_dm(figures_root, batch_size=2)
    assert len(dm.dataset("val")) % 2 == 1  # the two processes get different numbers of crops
    task = oracle_task(dm)
    single = trainer(tmp_path).validate(task, figures_dm(figures_root, batch_size=2), verbose=False)[0]
    ddp = trainer(tmp_path, strategy="ddp_spawn", devices=2).validate(task, figures_dm(figures_root, batch_size=2),
                                                                      verbose=False)[0]
    assert single["val/map"] > 0.05 and single["val/EPE"] > 0
    for key in ("val/PCK", "val/AUC", "val/EPE", "val/map", "val/map_50", "val/mar"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    half = trainer(tmp_path, limit_val_batches=1).validate(task, figures_dm(figures_root, batch_size=2),
                                                           verbose=False)[0]
    assert any(abs(half[k] - single[k]) > 1e-6 for k in ("val/PCK", "val/EPE", "val/map"))
