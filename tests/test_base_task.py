"""BaseTask hooks shared by every task: injected schedulers step when they should, evaluation-time options
stay out of checkpoints, backbone LR ratio groups, the epoch metric helper; the skeleton (argument problems, the loss
sum, its guard and logs, the evaluation and epoch-end hooks, steps per epoch) on a toy task."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_tasks import BaseTask, DetectionTask
from lit_tasks.schedules import warmup_cosine, warmup_multistep, warmup_poly


def tiny_task(**kwargs) -> DetectionTask:
    args = dict(num_classes=5, backbone="resnet10t", fpn_channels=16, head_convs=1, warmup_steps=0, num_log_images=0)
    return DetectionTask(**{**args, **kwargs})


def shapes():
    from datamodules import ShapesDetectionDataModule

    return ShapesDetectionDataModule(num_train=12, num_val=2, image_size=32, batch_size=2, num_workers=0)


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_lrs(task: DetectionTask, steps: int = 6) -> list[float]:
    record = RecordLR()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[record])
    trainer.fit(task, shapes())
    return record.lrs


def test_injected_one_cycle_steps_every_optimizer_step():
    """OneCycleLR's length is in steps: injected from the CLI it must step per step (Lightning's default for an
    injected scheduler is per epoch, which would keep the LR at its initial value for the whole epoch)."""
    def one_cycle(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=6)

    lrs = fit_lrs(tiny_task(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr_scheduler=one_cycle))
    expected_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = one_cycle(expected_opt)
    expected = []
    for _ in range(6):
        expected.append(expected_opt.param_groups[0]["lr"])
        expected_opt.step()
        reference.step()
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert len(set(lrs)) == 6  # a new LR every step


def test_scheduler_interval_option_overrides_the_default():
    def step_lr(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    opt = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    per_epoch = fit_lrs(tiny_task(optimizer=opt, lr_scheduler=step_lr), steps=4)  # 6 batches an epoch: all epoch 0
    assert per_epoch == [1.0] * 4
    per_step = fit_lrs(tiny_task(optimizer=opt, lr_scheduler=step_lr, lr_scheduler_interval="step"), steps=4)
    assert per_step == [1.0, 0.5, 0.25, 0.125]


def test_default_schedule_is_warmup_cosine_per_step():
    lrs = fit_lrs(tiny_task(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), warmup_steps=2), steps=6)
    # total = estimated stepping batches = 6 (max_steps); FCOS's warm-up starts at 1/3 of the LR (mmdet's ratio)
    assert lrs == pytest.approx([warmup_cosine(2, 6, warmup_start=1 / 3)(s) for s in range(6)], rel=1e-12)
    assert [warmup_cosine(2, 6)(s) for s in range(2)] == [0.5, 1.0]  # without a start: (step + 1) / warmup_steps


def test_backbone_lr_ratio_groups():
    from lit_tasks.param_groups import NORM_LAYERS

    task = tiny_task(backbone_lr_ratio=0.1)
    optimizer = task.configure_optimizers()["optimizer"]
    backbone = {id(p) for p in task.model.backbone.parameters()}
    biases = {id(p) for m in task.modules() if not isinstance(m, NORM_LAYERS)
              for n, p in m.named_parameters(recurse=False) if n == "bias"}  # FCOS's recipe: 2x the LR
    seen = 0
    for group in optimizer.param_groups:
        inside = {id(p) in backbone for p in group["params"]}
        bias = {id(p) in biases for p in group["params"]}
        assert len(inside) == 1 and len(bias) == 1  # a group is all backbone or all the rest, all biases or none
        expected = task.recipe("lr") * (0.1 if inside == {True} else 1.0) * (2.0 if bias == {True} else 1.0)
        assert group["initial_lr"] == pytest.approx(expected)
        seen += len(group["params"])
    assert seen == sum(1 for p in task.parameters() if p.requires_grad)


def test_schedules():
    assert [warmup_poly(2, 6, power=1.0)(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [warmup_multistep(1, [3, 5], 0.1)(s) for s in range(7)] == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    f = warmup_cosine(0, 4)
    assert [f(s) for s in range(5)] == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0])


def test_eval_options_are_attributes_not_hyperparameters():
    task = tiny_task(score_threshold=0.3, nms_threshold=0.4)
    assert task.score_threshold == 0.3 and task.postprocess.score_threshold == 0.3
    assert task.postprocess.nms_threshold == 0.4
    assert not set(DetectionTask.eval_options) & set(task.hparams)
    assert "lr" in task.hparams


# -- the skeleton every task shares (lit_tasks/base.py) ---------------------------------------------------------------
class ToyTask(BaseTask):
    """The smallest task: a linear regressor with two weighted loss terms and one logged-only entry."""

    logged_metric_keys = ("mean",)

    def __init__(self, width: int = 3, lr_drop_epochs: list[int] | None = None, lr_gamma: float = 0.1,
                 optimizer=None, lr_scheduler=None, lr_scheduler_interval=None) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval)

    def argument_problems(self, args):
        return super().argument_problems(args) + ([f"width must be >= 1, got {args['width']}"] if args["width"] < 1
                                                  else [])

    def configure_models(self) -> None:
        self.model = torch.nn.Linear(self.hparams.width, 1)

    def configure_metrics(self) -> None:
        from torchmetrics.aggregation import MeanMetric

        class Mean(MeanMetric):
            def compute(self):
                return {"mean": super().compute(), "extra": torch.tensor(1.0)}

        self.metrics = torch.nn.ModuleDict({stage: Mean() for stage in ("val", "test")})

    def compute_losses(self, batch, outputs=None):
        x, y = batch
        error = (self.model(x) if outputs is None else outputs).squeeze(1) - y
        return {"loss_l2": error.pow(2).mean(), "loss_l1": 0.5 * error.abs().mean(), "count": float(len(y))}

    def evaluation_step(self, batch, stage, dataloader_idx=0):
        self.log_loss(stage, self.compute_losses(batch), len(batch[1]))
        self.metrics[stage].update(batch[1])

    def default_scheduler(self, optimizer, total_steps):
        return self.step_decay(optimizer, self.hparams.lr_drop_epochs or [], self.hparams.lr_gamma)

    def test_table(self, values):
        return f"TOY TABLE mean={float(values['mean']):.3f}"


def toy_loader(n: int = 8, batch_size: int = 2, fill: float = 1.0):
    x = torch.full((n, 3), fill)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(n, dtype=torch.float32)),
                                       batch_size=batch_size)


def toy_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{**dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False), **kwargs})


def test_argument_problems_are_collected_and_prefixed_with_the_class_name():
    with pytest.raises(ValueError) as error:
        ToyTask(width=0, lr_drop_epochs=[3, 2])
    assert str(error.value) == ("ToyTask: lr_drop_epochs must be increasing epochs >= 1, got [3, 2]; "
                                "width must be >= 1, got 0")
    with pytest.raises(ValueError, match=r"^ToyTask: lr_drop_epochs must be a list of epochs .* got 4$"):
        ToyTask(lr_drop_epochs=4)  # the integer period of older action detection configs
    with pytest.raises(ValueError, match=r"^DetectionTask: box_loss must be one of .*; unknown model 'yolo'"):
        tiny_task(model="yolo", box_loss="l7")


def test_training_step_sums_the_loss_terms_and_logs_each():
    task = ToyTask()
    batch = next(iter(toy_loader()))
    with torch.no_grad():
        losses = task.compute_losses(batch)
    assert float(task.total_loss(losses, "train")) == pytest.approx(float(losses["loss_l2"] + losses["loss_l1"]))
    trainer = toy_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(task, toy_loader(), None)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/loss_l2", "train/loss_l1", "train/count"} <= set(metrics)
    assert float(metrics["train/loss"]) == pytest.approx(float(metrics["train/loss_l2"] + metrics["train/loss_l1"]))


def test_a_non_finite_loss_stops_training_naming_the_task_step_and_terms():
    with pytest.raises(FloatingPointError, match=r"ToyTask: non-finite train loss nan at step 0: .*'loss_l2': nan"):
        toy_trainer(max_steps=1, limit_val_batches=0).fit(ToyTask(), toy_loader(fill=float("nan")))


def test_evaluation_logs_the_loss_and_the_stage_metric_and_prints_the_test_table(capsys):
    task = ToyTask()
    validated = toy_trainer().validate(task, toy_loader(), verbose=False)[0]
    assert set(validated) == {"val/loss", "val/mean"} and validated["val/mean"] == pytest.approx(3.5)
    assert set(task.epoch_results["val"]) == {"mean", "extra"}  # the whole result is kept for callbacks
    capsys.readouterr()
    tested = toy_trainer().test(task, toy_loader(), verbose=False)[0]
    assert tested["test/mean"] == pytest.approx(3.5)
    assert "TOY TABLE mean=3.500" in capsys.readouterr().out


def test_steps_per_epoch_and_the_epoch_step_decay():
    task = ToyTask(lr_drop_epochs=[1, 2], lr_gamma=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert task.steps_per_epoch() == 1  # outside a Trainer, as total_steps
    record = RecordLR()
    trainer = toy_trainer(max_epochs=3, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[record])
    trainer.fit(task, toy_loader(n=6, batch_size=1))  # 6 batches, 2 accumulated: 3 optimizer steps an epoch
    assert task.steps_per_epoch() == 3
    assert record.lrs[::2] == pytest.approx([1.0] * 3 + [0.5] * 3 + [0.25] * 3)


def test_epoch_milestones_need_a_sized_loader():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(3), torch.tensor(0.0))] * 4)

    task = ToyTask(lr_drop_epochs=[1])
    with pytest.raises(ValueError, match="ToyTask: epoch milestones .* need training epochs of known length"):
        toy_trainer(max_epochs=1, limit_val_batches=0).fit(task, torch.utils.data.DataLoader(Stream(), batch_size=2))


# -- every task speaks the dialect -------------------------------------------------------------------------------------
def every_task():
    """A tiny instance of each of the five tasks, and arguments each refuses."""
    from lit_tasks import ActionDetectionTask, FaceRecognitionTask, PoseTask, SemanticSegmentationTask

    pose = dict(num_keypoints=4, backbone="test_resnet", input_size=[32, 24], flip_index=[0, 2, 1, 3],
                oks_sigmas=[0.05] * 4, num_log_images=0)
    action = dict(num_classes=6, feature_dim=12, window=8, num_future=4, embed_dim=32, enc_layers=1, enc_heads=4,
                  enc_mlp_dim=48, dec_layers=1, dec_heads=2, dec_ffn_dim=40, background_index=0, ambiguous_index=5)
    return {
        "detection": (lambda **kw: tiny_task(**kw), dict(num_classes=0)),
        "segmentation": (lambda **kw: SemanticSegmentationTask(**{**dict(num_classes=3, backbone="test_resnet",
                                                                          head_channels=8, num_log_images=0), **kw}),
                         dict(output_stride=4)),
        "face": (lambda **kw: FaceRecognitionTask(**{**dict(num_identities=4, backbone="test_resnet", image_size=32,
                                                            embedding_size=8, num_log_images=0), **kw}),
                 dict(num_identities=1)),
        "pose": (lambda **kw: PoseTask(**{**pose, **kw}), dict(loss="mse")),
        "action": (lambda **kw: ActionDetectionTask(**{**action, **kw}), dict(model="lstr")),
    }


@pytest.mark.parametrize("name", list(every_task()))
def test_every_task_runs_the_skeleton(name, monkeypatch):
    """No task re-spells a common part; each one's argument errors carry its class name, each one's training step
    stops on a non-finite loss, each one states the export contract and has a metric per stage."""
    factory, bad = every_task()[name]
    task = factory()
    cls = type(task)
    common = ("training_step", "validation_step", "test_step", "on_validation_epoch_end", "on_test_epoch_end",
              "steps_per_epoch", "log_epoch_metric", "total_loss")
    assert not [hook for hook in common if hook in vars(cls)]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: "):
        factory(**bad)
    monkeypatch.setattr(task, "compute_losses", lambda batch, outputs=None: {"loss_a": torch.tensor(1.0),
                                                                              "loss_b": torch.tensor(float("inf"))})
    with pytest.raises(FloatingPointError, match=rf"^{cls.__name__}: non-finite train loss inf at step 0: "):
        task.training_step((torch.zeros(2, 3),), 0)
    assert set(task.metrics) == {"val", "test"}
    assert task.export_input_names and task.export_output_names and task.export_opset >= 17
