"""BaseTask hooks shared by every task: injected schedulers step when they should, evaluation-time options
stay out of checkpoints, backbone LR ratio groups, the epoch metric helper."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_tasks import DetectionTask
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
