"""ActionDetectionTask end to end: every action config through the CLI, checkpoint round trip, DDP, bf16, export,
predictions on disk, the schedule and the streaming detector."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules import SyntheticStreamsDataModule
from lit_tasks import ActionDetectionTask
from lit_tasks.cli import run_cli
from lit_tasks.metrics.action import FrameLevelMAP
from lit_tasks.models.action.oadtr import class_probabilities
from golden import shared_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "action"


GOLDEN = shared_dir() / "golden" / "oad"
TINY = dict(embed_dim=32, enc_layers=1, enc_heads=4, enc_mlp_dim=48, dec_layers=2, dec_heads=2, dec_ffn_dim=40)
TINY_MODEL = [f"--model.init_args.{k}={v}" for k, v in TINY.items()]
TINY_WINDOWS = ["--data.init_args.window=8", "--data.init_args.num_future=4", "--data.init_args.batch_size=16",
                "--data.init_args.num_workers=0"]
SHORT_STREAMS = [*TINY_WINDOWS, "--data.init_args.num_train=6", "--data.init_args.num_val=3",
                 "--data.init_args.num_test=3", "--data.init_args.min_frames=30", "--data.init_args.max_frames=50"]
TINY_SYNTHETIC = [*SHORT_STREAMS, "--data.init_args.num_actions=4"]  # the streams of tiny_data()
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def tiny_data(**kwargs) -> SyntheticStreamsDataModule:
    args = dict(num_train=6, num_val=3, num_test=3, min_frames=30, max_frames=50, window=8, num_future=4,
                batch_size=16, num_workers=0)
    return SyntheticStreamsDataModule(**{**args, **kwargs})


def tiny_task(dm: SyntheticStreamsDataModule | None = None, **kwargs) -> ActionDetectionTask:
    dm = dm or tiny_data()
    torch.manual_seed(0)
    linked = dict(num_classes=dm.num_classes, feature_dim=dm.feature_dim, class_names=dm.class_names,
                  background_index=dm.background_index, ambiguous_index=dm.ambiguous_index, window=dm.window,
                  num_future=dm.num_future)
    return ActionDetectionTask(**{**linked, **TINY, **kwargs})


def test_every_action_config_has_a_test():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {"oadtr_synthetic.yaml", "oadtr_thumos.yaml",
                                                         "oadtr_thumos_pickles.yaml"}


def test_oadtr_synthetic_config_fast_dev_run(tmp_path):
    cli = run_cli(["fit", f"--config={CONFIGS / 'oadtr_synthetic.yaml'}", "--trainer.fast_dev_run=true",
                   f"--trainer.default_root_dir={tmp_path}", *TINY_MODEL, *SHORT_STREAMS, *QUIET])
    h = cli.model.hparams  # linked from the DataModule: the config's 6 actions, background and ambiguous
    assert (h.num_classes, h.feature_dim, h.ambiguous_index, h.window, h.num_future) == (8, 16, 7, 8, 4)
    assert h.class_names == ["Background", *(f"Action{i}" for i in range(1, 7)), "Ambiguous"]
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert {"val/mAP", "val/mcAP", "val/loss"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize("config", ["oadtr_thumos.yaml", "oadtr_thumos_pickles.yaml"])
def test_thumos_configs_fast_dev_run_on_the_golden_files(config, tmp_path, capsys, caplog):
    """Both layouts' configs on the golden THUMOS-style files: sizes from the data, every frame evaluated; then
    fit a step and test / predict with --ckpt_path, as a user of the published layouts would."""
    base = [f"--config={CONFIGS / config}", f"--data.init_args.root={GOLDEN}", f"--trainer.default_root_dir={tmp_path}",
            *TINY_MODEL, *TINY_WINDOWS, *QUIET]
    cli = run_cli(["fit", *base, "--trainer.fast_dev_run=true"])
    h = cli.model.hparams
    assert (h.num_classes, h.feature_dim, h.background_index, h.ambiguous_index) == (22, 12, 0, 21)
    assert h.class_names[7] == "CricketShot"
    dm = cli.datamodule
    # 2 training sessions: the seeded 10 % hold-out keeps one for validation, never the test session
    assert len(dm.feature_set("val").sessions) == 1 and dm.feature_set("test").session_names == ["video_test_9000001"]
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))

    ckpt_dir = tmp_path / "ckpt"
    run_cli(["fit", *base, "--trainer.max_steps=1", "--trainer.logger=false", f"--checkpoint.dirpath={ckpt_dir}"])
    ckpt = f"--ckpt_path={ckpt_dir / 'last.ckpt'}"
    caplog.clear()
    capsys.readouterr()
    test = run_cli(["test", *base, ckpt, "--trainer.logger=false"])
    out = capsys.readouterr()
    printed = out.out + out.err + caplog.text
    assert "frames='all': every frame" in printed and "PoleVault" in printed and "TennisSwing" in printed
    assert 0 <= float(test.trainer.callback_metrics["test/mAP"]) <= 1
    predictions = tmp_path / "predictions"
    run_cli(["predict", *base, ckpt, "--trainer.logger=false", f"--trainer.callbacks.output_dir={predictions}"])
    probs = np.load(predictions / "video_test_9000001.npy")
    assert probs.shape == (44, 22) and np.allclose(probs.sum(1), 1, atol=1e-5) and (probs[:, 21] == 0).all()


def test_checkpoint_round_trip(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    common = [f"--config={CONFIGS / 'oadtr_synthetic.yaml'}", *TINY_MODEL, *TINY_SYNTHETIC, *QUIET,
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    run_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.max_epochs=1", f"--checkpoint.dirpath={ckpt_dir}"])
    ckpt = ckpt_dir / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]  # primitives only: reloads with weights_only
    assert saved["embed_dim"] == 32 and "num_log_streams" not in saved
    validated = run_cli(["validate", *common, f"--ckpt_path={ckpt}", "--model.num_log_streams=0"])
    assert validated.model.num_log_streams == 0
    loaded = ActionDetectionTask.load_from_checkpoint(ckpt)
    assert loaded.hparams.window == 8 and loaded.num_log_streams == 3
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    validated.model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = validated.model(x), loaded(x)
        fresh = tiny_task().eval()(x)
    assert torch.equal(a.current, b.current) and torch.equal(a.anticipation, b.anticipation)
    assert not torch.allclose(fresh.current, a.current)  # the checkpoint's weights, not a new initialisation
    # A checkpoint trained on other data sizes is refused by name, not silently re-linked.
    with pytest.raises(ValueError, match="feature_dim"):
        run_cli(["validate", *common, f"--ckpt_path={ckpt}", "--data.init_args.feature_dim=12"])


def test_validation_metrics_equal_a_direct_evaluation():
    """val/mAP logged by the task == FrameLevelMAP over every frame of every validation session, computed here."""
    dm = tiny_data()
    task = tiny_task(dm).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(task, dm)
    ds = dm.val_set
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert len(ds) == sum(s.num_frames for s in dm.feature_set("val").sessions)  # every frame (frames="all")
    with torch.no_grad():
        probs = class_probabilities(task.model(batch["features"]).current, dm.ambiguous_index)
    metric = FrameLevelMAP(dm.num_classes, 0, dm.ambiguous_index)
    metric.update(probs, batch["target"])
    expected = metric.compute()
    assert metrics["val/mAP"] == pytest.approx(float(expected["mAP"]), abs=1e-6)
    assert metrics["val/mcAP"] == pytest.approx(float(expected["mcAP"]), abs=1e-6)
    assert task.epoch_results["val"]["AP"].shape == (6,)


def _odd_validation_data() -> SyntheticStreamsDataModule:
    dm = tiny_data(num_val=3, batch_size=8, seed=4)  # 117 windows in 15 batches
    windows = sum(s.num_frames for s in dm.feature_set("val").sessions)
    assert windows % 2 == 1 and math.ceil(windows / 8) % 2 == 1  # uneven over 2 ranks, in windows and in batches
    return dm


@pytest.mark.timeout(400)
def test_ddp_two_processes_validation_equals_one_process(tmp_path):
    task = tiny_task(_odd_validation_data())
    ddp = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)
    (ddp_metrics,) = ddp.validate(task, _odd_validation_data())
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (single_metrics,) = single.validate(task, _odd_validation_data())
    assert 0 < single_metrics["val/mAP"] < 1
    for key in ("val/mAP", "val/mcAP"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], abs=1e-6), key
    half = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=2, default_root_dir=tmp_path)
    (half_metrics,) = half.validate(task, _odd_validation_data())
    assert abs(half_metrics["val/mAP"] - single_metrics["val/mAP"]) > 1e-6  # a per-rank mAP would be caught


def test_bf16_mixed_fit_is_finite(tmp_path):
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, precision="bf16-mixed", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    task = tiny_task(num_log_streams=0)
    before = task.model.input_proj.weight.detach().clone()
    trainer.fit(task, tiny_data())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert not torch.equal(before, task.model.input_proj.weight)


@pytest.mark.parametrize("drops, epoch_factors", [(None, [1, 0.1, 0.01]), ([2], [1, 1, 0.1])])
def test_default_optimizer_and_step_decay_per_epoch(tmp_path, drops, epoch_factors):
    """Adam with L2 decay on every parameter; lr x 0.1 after each epoch (StepLR, lr_drop_epochs None, as released),
    or at the given epochs."""
    dm = tiny_data(batch_size=64)
    task = tiny_task(dm, lr=1e-3, num_log_streams=0, lr_drop_epochs=drops)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(task, dm)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(p.numel() for p in task.parameters())
    per_epoch = trainer.num_training_batches
    assert per_epoch >= 2 and len(lrs) == 3 * per_epoch
    expected = [1e-3 * epoch_factors[i // per_epoch] for i in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_predict_writes_one_npy_per_video_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "preds"
    args = ["predict", f"--config={CONFIGS / 'oadtr_synthetic.yaml'}", *TINY_MODEL, *TINY_SYNTHETIC, *QUIET,
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.anticipation=true"]
    cli = run_cli(args)
    dm, task = cli.datamodule, cli.model
    sessions = dm.feature_set("test").sessions
    assert json.loads((out / "class_names.json").read_text()) == dm.class_names
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(
        [f"{s.name}.npy" for s in sessions] + [f"{s.name}.anticipation.npy" for s in sessions])
    task.eval()
    for s in sessions:
        probs = np.load(out / f"{s.name}.npy")
        assert probs.shape == (s.num_frames, 6) and probs.dtype == np.float32
        assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs[:, 5] == 0).all()
        # row t is the model on the window ending at frame t: the streaming detector gives the same numbers
        detector = task.streaming()
        online = np.stack([detector.step(torch.from_numpy(f)).current.numpy() for f in s.features])
        np.testing.assert_allclose(probs, online, rtol=0, atol=1e-5)
        assert np.load(out / f"{s.name}.anticipation.npy").shape == (s.num_frames, 4, 6)
    before = (out / f"{sessions[0].name}.npy").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite"):
        run_cli(args)
    assert (out / f"{sessions[0].name}.npy").stat().st_mtime_ns == before
    # Frames without a full window are not predicted under frames=full_window: NaN rows, the others unchanged.
    partial = tmp_path / "partial"
    run_cli([*args[:-2], f"--trainer.callbacks.output_dir={partial}", "--data.init_args.frames=full_window"])
    for s in sessions:
        probs, full = np.load(partial / f"{s.name}.npy"), np.load(out / f"{s.name}.npy")
        assert probs.shape == full.shape and np.isnan(probs[:7]).all()
        np.testing.assert_allclose(probs[7:], full[7:], rtol=0, atol=1e-6)


def test_prediction_writer_marks_frames_without_a_window_as_nan(tmp_path):
    from lit_tasks.callbacks.action_writer import frame_table

    batches = [{"probs": torch.tensor([[0.2, 0.8], [0.6, 0.4]]), "session": torch.tensor([1, 0]),
                "frame": torch.tensor([3, 5])},
               {"probs": torch.tensor([[0.1, 0.9], [0.2, 0.8]]), "session": torch.tensor([1, 1]),
                "frame": torch.tensor([2, 3])}]  # frame 3 of session 1 twice (a padding sampler)
    table = frame_table(batches)
    assert table[1][0].tolist() == [2, 3]
    np.testing.assert_allclose(table[1][1], [[0.1, 0.9], [0.2, 0.8]])
    assert table[0][0].tolist() == [5]


def test_streaming_detector_equals_the_windowed_task_on_a_long_stream():
    dm = tiny_data(min_frames=30, max_frames=31, pad="zeros")
    task = tiny_task(dm, dropout=0.3).train()  # streaming() must switch dropout off
    s = dm.feature_set("val").sessions[0]
    detector = task.streaming(pad="zeros")
    online = torch.stack([detector.step(torch.from_numpy(f)).current for f in s.features])
    ds = dm.dataset("val")
    rows = [i for i in range(len(ds)) if int(ds.index[i][0]) == 0]
    batch = torch.utils.data.default_collate([ds[i] for i in rows])
    with torch.no_grad():
        offline = task.probabilities(task(batch["features"]))[0]
    assert s.num_frames > 3 * dm.window
    torch.testing.assert_close(online, offline, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pad must be"):
        task.streaming(pad="reflect")


def _load_export_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_windowed_model_to_torchscript_and_onnx(tmp_path):
    export_tool = _load_export_tool()
    task = tiny_task().eval()
    report = export_tool.export(task, tmp_path, atol=1e-4)
    assert set(report) == {"torchscript", "onnx"}
    x = task.export_example(5)[0]
    assert x.shape == (5, 8, 16)
    with torch.no_grad():
        current, anticipation = task.probabilities(task(x))
    expected = torch.cat([current[:, None], anticipation], 1).numpy()
    scripted = torch.jit.load(report["torchscript"]["path"])(x).detach().numpy()
    onnx_out = export_tool.run_exported("onnx", report["onnx"]["path"], (x,))
    np.testing.assert_allclose(scripted, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(onnx_out, expected, rtol=0, atol=1e-4)
    assert (onnx_out[..., 5] == 0).all()  # the ambiguous column is out of the softmax in the exported graph too
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(report["onnx"]["path"]).get_inputs()]
    assert names == ["features"]
    # The command line: a trained checkpoint, loaded by class path.
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(tiny_task(num_log_streams=0), tiny_data())
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    cli_report = export_tool.main(["--task", "lit_tasks.ActionDetectionTask", "--ckpt", str(tmp_path / "tiny.ckpt"),
                                   "--out", str(tmp_path / "cli")])
    assert all(r["max_abs_error"] <= 1e-4 for r in cli_report.values())


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        tiny_task(model="lstr")
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        tiny_task(class_names=["a", "b"])
    with pytest.raises(ValueError, match="ambiguous_index=6 outside"):
        tiny_task(ambiguous_index=6)
    task = tiny_task()
    with pytest.raises(ValueError, match=r"expected features \(B, 8, 16\)"):
        task(torch.randn(2, 8, 15))


def test_test_metrics_and_anticipation_map_equal_a_direct_evaluation():
    dm = tiny_data()
    task = tiny_task(dm).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(task, dm)
    batch = all_windows(dm.dataset("test"))
    with torch.no_grad():
        current, anticipation = task.probabilities(task(batch["features"]))
    expected = {}
    for name, probs, targets in [("test/mAP", current, batch["target"])] + [
            (f"step{j}", anticipation[:, j], batch["future_target"][:, j]) for j in range(4)]:
        metric = FrameLevelMAP(6, 0, 5)
        metric.update(probs, targets)
        expected[name] = float(metric.compute()["mAP"])
    assert metrics["test/mAP"] == pytest.approx(expected["test/mAP"], abs=1e-6)
    steps = [expected[f"step{j}"] for j in range(4)]
    assert metrics["test/anticipation_mAP"] == pytest.approx(float(np.mean(steps)), abs=1e-6)
    assert len(set(steps)) == 4  # four different numbers: each step is scored against its own frames


def all_windows(ds) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))])


def test_timeline_figure_draws_truth_colours_and_probabilities():
    from lit_tasks.callbacks.action_timelines import class_colours, timeline_figure

    labels = np.array([0, 1, 1, 2, 2, 3, 0])
    probs = np.eye(4)[[0, 1, 2, 2, 2, 0, 0]] * 0.9 + 0.025
    stream = {"name": "video_a", "frame": np.arange(7), "labels": labels, "probs": probs}
    figure = timeline_figure([stream, {**stream, "name": "video_b"}], ["bg", "run", "jump", "amb"], 0, 3)
    strip, lines = figure.axes[0], figure.axes[1]
    assert len(figure.axes) == 4 and "video_a" in strip.get_title("left") and "video_b" in figure.axes[2].get_title("left")
    colours = class_colours(4, 0, 3)
    np.testing.assert_allclose(strip.images[0].get_array()[0], colours[labels])  # one coloured cell per frame
    drawn = {line.get_label(): line.get_ydata() for line in lines.get_lines()}
    assert set(drawn) == {"run", "jump"}  # action classes only: no background or ambiguous curve
    np.testing.assert_allclose(drawn["jump"], probs[:, 2])
    assert tuple(colours[0]) == (1, 1, 1, 1) and len({tuple(c) for c in colours}) == 4


def test_fit_logs_the_timeline_figure_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(tiny_task(num_log_streams=2), tiny_data())
    events = EventAccumulator(str(next(Path(logger.log_dir).glob("events*"))), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val/streams (truth | probabilities)"]
