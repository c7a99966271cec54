"""FaceRecognitionTask end to end: CLI on every face config, checkpoints, predict files, precision, DDP."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from PIL import Image

from datamodules.synthetic.identities import SyntheticFacesDataModule
from lit_tasks.callbacks.embeddings import EmbeddingProjector
from lit_tasks.cli import run_cli as cli_main
from lit_tasks.face_recognition import FaceRecognitionTask
from lit_tasks.losses.partial_fc import PartialFC

ROOT = Path(__file__).resolve().parents[1]
# arcface_tfrecord.yaml needs shards: tests/test_tfrecord_faces.py runs it; arcface_ms1m.yaml needs a RecordIO pack:
# tests/test_recordio_faces.py runs it on the golden insightface files.
FACE_CONFIGS = sorted(p for p in (ROOT / "configs" / "face").glob("*.yaml") if p.name not in ("arcface_tfrecord.yaml",
                                                                                              "arcface_ms1m.yaml"))
SMALL_SYNTHETIC = ["--data.num_train_identities=6", "--data.samples_per_identity=2", "--data.num_val_identities=4",
                   "--data.val_samples_per_identity=2", "--data.num_val_pairs=20", "--data.batch_size=4",
                   "--data.num_workers=0"]


def tiny_task(**kwargs) -> FaceRecognitionTask:
    torch.manual_seed(0)
    args = dict(num_identities=6, backbone="test_resnet", image_size=32, embedding_size=16, scale=16.0)
    return FaceRecognitionTask(**{**args, **kwargs})


def tiny_data(**kwargs) -> SyntheticFacesDataModule:
    args = dict(num_train_identities=6, samples_per_identity=4, num_val_identities=4, val_samples_per_identity=3,
                num_val_pairs=20, image_size=32, batch_size=8, num_workers=0)
    return SyntheticFacesDataModule(**{**args, **kwargs})


def quiet_trainer(**kwargs) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return pl.Trainer(**{**args, **kwargs})


def write_face_folder(root: Path, identities: int = 3, per_identity: int = 2, size: int = 112) -> Path:
    rng = np.random.default_rng(0)
    for i in range(identities):
        for j in range(per_identity):
            folder = root / f"person{i}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"person{i}_{j + 1:04d}.png")
    pairs = root / "pairs.txt"
    pairs.write_text("person0 1 2\nperson0 1 person1 2\nperson1 1 2\nperson2 1 person0 2\n")
    return pairs


def test_every_face_config_is_covered() -> None:
    names = {p.name for p in (ROOT / "configs" / "face").glob("*.yaml")}
    assert names == {"arcface_synthetic.yaml", "arcface_folder.yaml", "arcface_tfrecord.yaml", "arcface_ms1m.yaml"}


@pytest.mark.parametrize("config", FACE_CONFIGS, ids=lambda p: p.name)
def test_cli_fast_dev_run(config: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu"]
    if "folder" in config.name:
        pairs = write_face_folder(tmp_path / "faces")
        args += [f"--data.root={tmp_path / 'faces'}", f"--data.pairs={pairs}", "--data.batch_size=4",
                 "--data.num_workers=0"]
    else:
        args += SMALL_SYNTHETIC
    cli = cli_main(args)
    assert isinstance(cli.model, FaceRecognitionTask)
    assert cli.model.hparams.num_identities == cli.datamodule.num_identities  # linked by the CLI
    assert 0.0 <= cli.trainer.callback_metrics["val/verification_accuracy"].item() <= 1.0


def test_image_size_is_linked_from_the_datamodule_and_a_different_one_refused(tmp_path) -> None:
    """The face configs state the image size once, for the data; the task is built for it. A task value that
    differs would build the embedding FC for another size."""
    config = ["fit", "--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), "--trainer.fast_dev_run=true",
              f"--trainer.default_root_dir={tmp_path}", "--model.embedding_size=16", *SMALL_SYNTHETIC]
    for path in (ROOT / "configs" / "face").glob("*.yaml"):
        assert "image_size" not in yaml.safe_load(path.read_text())["model"]["init_args"], f"{path}: model.init_args.image_size (the CLI links it from data)"
    cli = cli_main([*config, "--data.image_size=32"])
    assert cli.datamodule.image_size == cli.model.hparams.image_size == cli.model.model.image_size == 32
    with pytest.raises(ValueError, match=r"model image_size=48 .* differs from the DataModule's image_size=32"):
        cli_main([*config, "--data.image_size=32", "--model.image_size=48"])


@pytest.fixture(scope="module")
def trained_cli_run(tmp_path_factory) -> Path:
    """`lit-tasks fit` of the synthetic config for 2 steps; returns the run folder (cwd of the run)."""
    run = tmp_path_factory.mktemp("cli_run")
    cwd = os.getcwd()
    os.chdir(run)
    try:
        cli_main(["fit", "--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), "--trainer.max_steps=2",
                  "--trainer.limit_val_batches=1", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
                  *SMALL_SYNTHETIC])
    finally:
        os.chdir(cwd)
    return run


def test_cli_checkpoint_round_trip_and_predict_files(trained_cli_run: Path, monkeypatch) -> None:
    monkeypatch.chdir(trained_cli_run)
    last = next(trained_cli_run.glob("lightning_logs/arcface_synthetic/version_*/checkpoints/last.ckpt"))
    # Primitive hyperparameters: the checkpoint loads with weights_only=True (what --ckpt_path does).
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["hyper_parameters"]["num_identities"] == 6
    task = FaceRecognitionTask.load_from_checkpoint(last, map_location="cpu")
    assert torch.equal(task.criterion.weight, state["state_dict"]["criterion.weight"])
    cli_main(["predict", "--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), f"--ckpt_path={last}",
              "--trainer.accelerator=cpu", *SMALL_SYNTHETIC])
    out = trained_cli_run / "lightning_logs/arcface_synthetic/predictions"
    embeddings = np.load(out / "embeddings.npy")
    names = (out / "names.txt").read_text().splitlines()
    assert embeddings.shape == (8, 128) and embeddings.dtype == np.float32  # 4 identities x 2 samples
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert names[:3] == ["id00006/000", "id00006/001", "id00007/000"] and len(names) == 8
    # The written rows are the checkpoint's embeddings of those images.
    dm = SyntheticFacesDataModule(**yaml.safe_load((ROOT / "configs/face/arcface_synthetic.yaml").read_text())
                                  ["data"]["init_args"] | {"num_train_identities": 6, "num_val_identities": 4,
                                                           "val_samples_per_identity": 2, "num_workers": 0})
    dm.setup("predict")
    image = dm.predict_set[3]["image"][None]
    np.testing.assert_allclose(embeddings[3], task.embed(image)[0].numpy(), atol=1e-5)


def test_embed_is_normalised_and_flip_fused() -> None:
    task = tiny_task()
    images = torch.rand(3, 3, 32, 32)
    emb = task.embed(images)
    assert emb.shape == (3, 16) and task.training  # embed() restores the mode
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # f(x) + f(mirror x) is the same for x and its mirror.
    torch.testing.assert_close(task.embed(images.flip(-1)), emb, atol=1e-5, rtol=1e-4)
    plain = task.embed(images, flip=False)
    assert not torch.allclose(plain, emb, atol=1e-3)
    with pytest.raises(ValueError, match="built for 32x32"):
        task(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="at least 2"):
        FaceRecognitionTask(num_identities=1)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_partial_fc_trains_under_mixed_precision(precision: str) -> None:
    task = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=20)
    before = task.criterion.weight.clone()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, precision=precision)
    trainer.fit(task, tiny_data(num_train_identities=20, batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = torch.nonzero((task.criterion.weight != before).any(dim=1)).squeeze(1)
    # The lazy update touched exactly the 10 sampled rows, and momentum exists only for them.
    assert torch.equal(changed, task.criterion.last_index) and len(changed) == 10
    assert (task.criterion.momentum_buffer.abs().sum(1) > 0).sum() == 10


def test_partial_fc_checkpoint_round_trip(tmp_path) -> None:
    task = tiny_task(partial_fc=True, sample_rate=1.0)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, tiny_data())
    trainer.save_checkpoint(tmp_path / "pfc.ckpt")
    loaded = FaceRecognitionTask.load_from_checkpoint(tmp_path / "pfc.ckpt", map_location="cpu")
    assert isinstance(loaded.criterion, PartialFC)
    assert torch.equal(loaded.criterion.weight, task.criterion.weight)
    assert torch.equal(loaded.criterion.momentum_buffer, task.criterion.momentum_buffer)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.embed(images), task.embed(images))
    tested = quiet_trainer().test(loaded, tiny_data())[0]  # `lit-tasks test`: the same pair protocol
    assert 0.0 <= tested["test/verification_accuracy"] <= 1.0 and "test/tar_at_far_1e-3" in tested


def test_projector_and_roc_figure_are_logged(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="face")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    task = tiny_task(num_log_images=10)
    assert [type(c) for c in task.configure_callbacks()] == [EmbeddingProjector]  # attached by the task itself
    trainer.fit(task, tiny_data())
    run = Path(logger.log_dir)
    projector = (run / "projector_config.pbtxt").read_text()
    assert "val_embeddings" in projector
    metadata = next(run.glob("*/val_embeddings/metadata.tsv")).read_text().splitlines()
    assert len(metadata) == 10 and metadata[0].startswith("id0000")
    assert next(run.glob("*/val_embeddings/sprite.png")).is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    assert "val/roc" in events.Tags()["images"]
    assert "val/verification_accuracy" in events.Tags()["scalars"]


class RecordShard(pl.Callback):
    """Writes each process's shard of the centres to ``folder/shard{rank}.txt`` (runs in the children)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        head = pl_module.criterion
        Path(self.folder, f"shard{trainer.global_rank}.txt").write_text(f"{head.class_start} {head.num_local}")


@pytest.mark.slow
def test_ddp_two_processes_partial_fc_fit_and_checkpoint(tmp_path) -> None:
    """2 CPU processes (gloo, ddp_spawn): sharded centres, gathered into a full checkpoint."""
    task = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=7)
    initial = task.criterion.weight.clone()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, enable_checkpointing=False, callbacks=[RecordShard(str(tmp_path))])
    trainer.fit(task, tiny_data(num_train_identities=7))
    assert [(tmp_path / f"shard{r}.txt").read_text() for r in range(2)] == ["0 4", "4 3"]
    changed = (task.criterion.weight != initial).any(dim=1)
    assert changed[:4].any() and changed[4:].any()  # trained rows of both shards came back
    trainer.save_checkpoint(tmp_path / "ddp.ckpt")  # main process: the module holds all 7 rows again
    state = torch.load(tmp_path / "ddp.ckpt", weights_only=True)["state_dict"]
    assert state["criterion.weight"].shape == (7, 16)
    loaded = FaceRecognitionTask.load_from_checkpoint(tmp_path / "ddp.ckpt")
    assert torch.equal(loaded.criterion.weight, task.criterion.weight)
    # Verification over 2 processes (21 pairs: the DistributedSampler pads one duplicate) equals 1 process.
    data = tiny_data(num_train_identities=7, num_val_pairs=21, batch_size=4)
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)
    single = quiet_trainer(devices=1)
    ddp_metrics, single_metrics = ddp.validate(task, data)[0], single.validate(task, data)[0]
    for key in ("val/verification_accuracy", "val/auc", "val/tar_at_far_1e-2"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], abs=1e-7), key


# -- Partial FC centres and the injected optimizer (issue 16 item 12) ------------------------------------------
def fixed_loader(num_identities: int = 6, batch_size: int = 8) -> torch.utils.data.DataLoader:
    """Synthetic faces in a fixed order without random flips: two runs see exactly the same batches."""
    from datamodules.synthetic.identities import SyntheticIdentities

    dataset = SyntheticIdentities(num_identities, 4, image_size=32, augment="none")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)


def adamw(params):
    # eps well above float32 noise: a centre gradient within rounding of 0 (the two runs compute the softmax
    # gradient in different orders) must not get a full-size Adam step in one run and not in the other.
    return torch.optim.AdamW(params, lr=3e-3, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05)


def linear_decay(optimizer):
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.2, total_iters=3)


def sgd_nesterov(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.8, nesterov=True, weight_decay=1e-3)


@pytest.mark.parametrize("optimizer", [adamw, sgd_nesterov], ids=["adamw", "sgd_nesterov"])
def test_partial_fc_centres_follow_the_injected_optimizer_and_schedule(optimizer) -> None:
    """Every row sampled: the lazy centre update equals the injected optimizer on an ordinary centre Parameter.

    The full-softmax task trains its centres as a Parameter of the injected optimizer (AdamW or Nesterov SGD, lr
    decayed linearly per step); Partial FC must give the same centres (and so the same backbone) step by step.
    Tolerance: 3 steps of float32 updates of O(1e-2) weights whose gradients agree to ~1e-6 relative.
    """
    kwargs = dict(optimizer=optimizer, lr_scheduler=linear_decay, lr_scheduler_interval="step", lr=0.5)
    full = tiny_task(**kwargs)
    pfc = tiny_task(partial_fc=True, sample_rate=1.0, **kwargs)
    pfc.model.load_state_dict(full.model.state_dict())
    with torch.no_grad():
        pfc.criterion.weight.copy_(full.criterion.weight)
    for task in (full, pfc):
        quiet_trainer(max_steps=3, limit_val_batches=0).fit(task, train_dataloaders=fixed_loader())
    assert not torch.equal(pfc.criterion.weight, full.criterion.weight.new_zeros(()))  # trained at all
    torch.testing.assert_close(pfc.criterion.weight, full.criterion.weight.detach(), rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(pfc.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


class NaNBackboneGradient(pl.Callback):
    """Makes one backbone gradient NaN on the given steps, as an fp16 overflow would: the GradScaler skips them."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps, self.scales = steps, []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps:
            grad = next(p for p in pl_module.model.parameters() if p.grad is not None).grad
            grad[(0,) * grad.ndim] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def fp16_with_scaler() -> MixedPrecision:
    """float16 autocast with torch's GradScaler on the CPU (``precision="16-mixed"`` alone becomes bf16 there)."""
    # A small initial scale: the default 2**16 overflows float16 gradients here, and the step is skipped anyway.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=8.0))


def test_partial_fc_centres_skip_the_steps_the_grad_scaler_skips() -> None:
    """16-mixed on CPU: a NaN backbone gradient makes torch's GradScaler skip optimizer.step and halve its scale;
    the centres must not move on that step either (they did: the lazy update ran in on_before_optimizer_step)."""
    task = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=6)
    before_model = {k: v.clone() for k, v in task.model.state_dict().items()}
    before = task.criterion.weight.clone()
    nan = NaNBackboneGradient(steps=(0,))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, plugins=[fp16_with_scaler()], callbacks=[nan])
    trainer.fit(task, train_dataloaders=fixed_loader())
    assert trainer.precision_plugin.scaler.get_scale() == nan.scales[0] / 2  # the scaler saw the NaN and skipped
    assert all(torch.equal(v, before_model[k]) for k, v in task.model.state_dict().items() if "num_batches" not in k
               and "running" not in k)  # the optimizer step was skipped (BN statistics move in forward)
    assert torch.equal(task.criterion.weight, before)
    # A step the scaler takes still updates the centres.
    nan.steps, nan.scales = (), []
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, plugins=[fp16_with_scaler()], callbacks=[nan])
    trainer.fit(task, train_dataloaders=fixed_loader())
    assert trainer.precision_plugin.scaler.get_scale() == nan.scales[0]  # taken: no inf, the scale stays
    assert not torch.equal(task.criterion.weight, before)


class SeedEachStep(pl.Callback):
    """Seeds torch before each step, so Partial FC's negative sampling does not depend on how the run got there
    (Lightning restores no RNG state, and a resumed run draws loader seeds at other moments)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        torch.manual_seed(1000 + trainer.global_step)


def test_partial_fc_resume_with_adamw_continues_exactly(tmp_path) -> None:
    """Per-row AdamW state (moments, step counts) is in the checkpoint: 2 epochs == 1 epoch + save + resume 1."""
    def decay(optimizer):
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=4)

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[FaceRecognitionTask, pl.Trainer]:
        task = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=6, optimizer=adamw, lr_scheduler=decay,
                         lr_scheduler_interval="step")
        trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=0,
                                callbacks=[SeedEachStep()])
        trainer.fit(task, train_dataloaders=fixed_loader(), ckpt_path=ckpt_path)
        return task, trainer

    straight, _ = run(2)
    first, trainer = run(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    state = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["state_dict"]
    assert {"criterion.exp_avg", "criterion.exp_avg_sq", "criterion.row_steps"} <= set(state)
    assert len(set(state["criterion.row_steps"].tolist())) > 1  # rows sampled a different number of times
    resumed, _ = run(2, str(tmp_path / "epoch1.ckpt"))
    for name in ("weight", "exp_avg", "exp_avg_sq", "row_steps"):
        assert torch.equal(getattr(resumed.criterion, name), getattr(straight.criterion, name)), name


def test_a_checkpoint_with_the_old_head_keys_still_loads_and_resumes(tmp_path) -> None:
    """Checkpoints written when the margin head was ``task.head`` (``head.*`` keys) load into ``task.criterion``."""
    task = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=6)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(task, tiny_data(num_train_identities=6))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    checkpoint["state_dict"] = {("head." + k.removeprefix("criterion.") if k.startswith("criterion.") else k): v
                                for k, v in checkpoint["state_dict"].items()}
    assert "head.weight" in checkpoint["state_dict"] and "head.momentum_buffer" in checkpoint["state_dict"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = FaceRecognitionTask.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    for name in ("weight", "momentum_buffer"):
        assert torch.equal(getattr(loaded.criterion, name), getattr(task.criterion, name)), name
    resumed = tiny_task(partial_fc=True, sample_rate=0.5, num_identities=6)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(resumed, tiny_data(num_train_identities=6),
                                                         ckpt_path=str(tmp_path / "old.ckpt"))
    assert resumed.trainer.global_step == 3


# -- several verification sets in one validation loop ---------------------------------------------------------------
def write_synthetic_bin(path: Path, num_pairs: int, first_identity: int, image_size: int = 32) -> Path:
    """An insightface-style .bin (pickled (JPEG list, issame list)) of synthetic faces, same and different pairs."""
    import io
    import pickle

    from datamodules.synthetic.identities import render_identity

    def jpeg(identity: int, sample: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(render_identity(identity, sample, image_size=image_size)).save(out, format="JPEG", quality=95)
        return out.getvalue()

    images, issame = [], []
    for k in range(num_pairs):
        a = first_identity + k // 2
        b = a if k % 3 else a + 50  # two same pairs, then a different one
        images += [jpeg(a, 0), jpeg(b, 1)]
        issame.append(a == b)
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=2)
    return path


def two_set_data(tmp_path: Path, batch_size: int = 4):
    from datamodules.faces.folders import IdentityFolderDataModule

    write_face_folder(tmp_path / "faces", size=32)
    bins = [str(write_synthetic_bin(tmp_path / "setA.bin", 13, 1000)),
            str(write_synthetic_bin(tmp_path / "setB.bin", 20, 2000))]
    return IdentityFolderDataModule(str(tmp_path / "faces"), val_bins=bins, image_size=32, batch_size=batch_size,
                                    num_workers=0)


def test_several_sets_equal_each_set_alone(tmp_path) -> None:
    """val/<set>/* of one validation loop over two .bin sets == the verification metric run on each set alone."""
    from lit_tasks.metrics.verification import VerificationMetric

    dm = two_set_data(tmp_path)
    task = tiny_task(num_identities=dm.num_identities, verification_sets=dm.verification_sets)
    assert dm.verification_sets == ["setA", "setB"]
    logged = quiet_trainer().validate(task, dm)  # one result dict per dataloader, holding every logged value
    results = logged[0]
    accuracies = []
    for name, loader in zip(dm.verification_sets, dm.val_dataloader()):
        alone = VerificationMetric()
        for batch in loader:
            alone.update(task.embed(batch["image_a"]), task.embed(batch["image_b"]), batch["same"], batch["index"])
        expected = alone.compute()
        accuracies.append(float(expected["verification_accuracy"]))
        assert results[f"val/{name}/accuracy"] == pytest.approx(float(expected["verification_accuracy"]), abs=1e-7)
        for key in ("tar_at_far_1e-3", "auc", "threshold", "accuracy_std"):
            source = "verification_accuracy_std" if key == "accuracy_std" else key
            assert results[f"val/{name}/{key}"] == pytest.approx(float(expected[source]), abs=1e-6), (name, key)
        assert torch.equal(task.epoch_results[f"val/{name}"]["fold_accuracy"], expected["fold_accuracy"])
    assert results["val/verification_accuracy"] == pytest.approx(sum(accuracies) / 2, abs=1e-7)
    assert not any("dataloader_idx" in key for key in results)  # epoch-end keys carry no loader suffix
    assert task.epoch_results["val"]["set_name"] == "setA"  # the projector / ROC view: the first set
    with pytest.raises(ValueError, match=r"verification dataloader 1 has no set: verification_sets=None names 1"):
        quiet_trainer().validate(tiny_task(num_identities=3), dm)


@pytest.mark.slow
def test_several_sets_under_ddp_equal_one_process(tmp_path) -> None:
    """2 processes (gloo, ddp_spawn), sets of 13 and 20 pairs and batches of 4: every per-set value as in 1 process."""
    dm = two_set_data(tmp_path, batch_size=4)
    task = tiny_task(num_identities=dm.num_identities, verification_sets=dm.verification_sets)
    single = quiet_trainer(devices=1).validate(task, dm)[0]
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path).validate(task, dm)[0]
    for key in ("val/setA/accuracy", "val/setB/accuracy", "val/setB/tar_at_far_1e-2", "val/setA/auc",
                "val/verification_accuracy"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-7), key
