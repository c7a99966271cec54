"""Canaries: one per private Lightning / torch member lit-tasks relies on (lit_tasks/run/lightning_seams.py and
datamodules/loaders.py's DataLoader seam). Each fails on a release that renames, removes or re-signs the member, or
stops calling it where lit-tasks counts on it, and each seam function is shown to raise the clear error (naming the
installed version) when its member is gone. Moving the supported range: README, "Supported versions"."""

from __future__ import annotations

import inspect
import re
import tomllib
import typing
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.plugins.precision import MixedPrecision
from packaging.requirements import Requirement
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter

from datamodules import loaders
from datamodules.loaders import ResumableDataLoader, torch_index_sampler
from lit_tasks.run import lightning_seams as seams

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_ERROR = rf"lit-tasks needs Lightning's .* installed Lightning {re.escape(lightning.__version__)} lacks"
TORCH_ERROR = rf"installed torch {re.escape(torch.__version__)} lacks"


def parameters(function: typing.Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def source(function: typing.Callable) -> str:
    return inspect.getsource(function)


def bare_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


# -- the supported range ------------------------------------------------------------------------------------------
def test_the_installed_lightning_and_torch_are_in_the_pinned_range() -> None:
    """The seams below are checked against the versions pyproject.toml pins; the constants that errors quote agree."""
    dependencies = {Requirement(d).name: Requirement(d) for d in
                    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert dependencies["lightning"].specifier == Requirement(seams.SUPPORTED_LIGHTNING).specifier
    assert dependencies["torch"].specifier == Requirement(seams.SUPPORTED_TORCH).specifier
    assert loaders.SUPPORTED_TORCH == seams.SUPPORTED_TORCH  # datamodules cannot import lit_tasks: stated twice
    assert dependencies["lightning"].specifier.contains(lightning.__version__), lightning.__version__
    assert dependencies["torch"].specifier.contains(torch.__version__.split("+")[0]), torch.__version__


# -- the training loop (TaskCheckpoint.on_train_batch_end) --------------------------------------------------------
def test_training_loop_seams_exist_with_their_signatures() -> None:
    assert parameters(_TrainingEpochLoop._should_check_val_fx) == ("self", "data_fetcher")
    assert parameters(_TrainingEpochLoop._num_ready_batches_reached) == ("self",)
    assert parameters(_TrainingEpochLoop._should_accumulate) == ("self",)
    assert isinstance(inspect.getattr_static(_FitLoop, "_can_stop_early"), property)
    # The epoch loop asks _should_check_val_fx after each batch, with the fit loop's fetcher; a stop request makes
    # it say True (lit-tasks hides the request while asking).
    assert "self._should_check_val_fx(data_fetcher)" in source(_TrainingEpochLoop.on_advance_end)
    assert "should_stop" in source(_TrainingEpochLoop._should_check_val_fx)


def test_training_loop_seams_answer_on_a_trainer() -> None:
    trainer = bare_trainer(max_steps=3)
    assert "_data_fetcher" in vars(trainer.fit_loop)
    assert seams.stop_allowed(trainer) is True
    assert seams.between_micro_batches(trainer) in (True, False)
    assert seams.epoch_batches_done(trainer) in (True, False)


@pytest.mark.parametrize("function, owner, name", [
    (seams.scheduled_validation_follows, _TrainingEpochLoop, "_should_check_val_fx"),
    (seams.epoch_batches_done, _TrainingEpochLoop, "_num_ready_batches_reached"),
    (seams.between_micro_batches, _TrainingEpochLoop, "_should_accumulate"),
    (seams.stop_allowed, _FitLoop, "_can_stop_early"),
])
def test_a_missing_training_loop_member_names_the_lightning_version(function, owner, name, monkeypatch) -> None:
    trainer = bare_trainer(max_steps=3)
    monkeypatch.delattr(owner, name)
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + rf" \({owner.__qualname__}\.{name}\)"):
        function(trainer)


# -- ModelCheckpoint (TaskCheckpoint) -------------------------------------------------------------------------------
def test_model_checkpoint_seams_exist_and_every_last_ckpt_write_goes_through_save_last_checkpoint() -> None:
    seams.check_model_checkpoint_seams()
    assert "_last_global_step_saved" in vars(ModelCheckpoint())
    assert "self._last_global_step_saved = trainer.global_step" in source(ModelCheckpoint._save_checkpoint)
    for hook in ("on_train_batch_end", "on_train_epoch_end", "on_validation_end", "on_train_end"):
        assert "self._save_last_checkpoint(trainer, monitor_candidates)" in source(getattr(ModelCheckpoint, hook)), hook
    # The skip rule TaskCheckpoint's _save_last_only works around (a save at an already saved step is skipped).
    skip = source(ModelCheckpoint._should_skip_saving_checkpoint)
    assert "self._last_global_step_saved == trainer.global_step" in skip


def test_model_checkpoint_accessors_read_and_write_the_real_members() -> None:
    callback, trainer = ModelCheckpoint(), bare_trainer(max_steps=1)
    seams.set_last_saved_step(callback, 7)
    assert seams.last_saved_step(callback) == 7 == vars(callback)["_last_global_step_saved"]
    assert set(seams.monitor_candidates(callback, trainer)) >= {"epoch", "step"}
    assert seams.saves_at_train_epoch_end(callback, trainer) in (True, False)


def test_a_changed_model_checkpoint_hook_stops_task_checkpoint_at_init(monkeypatch) -> None:
    from lit_tasks.run.callbacks import TaskCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "_save_last_checkpoint", lambda self, trainer: None)
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(ModelCheckpoint\._save_last_checkpoint\('trainer', "
                                                             r"'monitor_candidates'\) \(it takes \('trainer',\)\)\)"):
        TaskCheckpoint()
    monkeypatch.delattr(ModelCheckpoint, "_save_last_checkpoint")
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(ModelCheckpoint\._save_last_checkpoint\)"):
        TaskCheckpoint()


def test_a_renamed_saved_step_is_an_error_not_a_new_attribute() -> None:
    callback = ModelCheckpoint()
    del callback._last_global_step_saved
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(ModelCheckpoint\._last_global_step_saved\)"):
        seams.set_last_saved_step(callback, 3)
    assert "_last_global_step_saved" not in vars(callback)


# -- exact resume: the training loader's saved position -------------------------------------------------------------
def test_loader_state_seams_exist_and_hold_what_the_checkpoint_loaded() -> None:
    assert "self._combined_loader_states_to_load = state_dict.get(\"combined_loader\", [])" in source(
        _FitLoop.on_load_checkpoint)
    assert parameters(_FitLoop._load_combined_loader_states) == ("self",)
    assert "self._combined_loader_states_to_load" in source(_FitLoop._load_combined_loader_states)
    from lightning.pytorch.utilities.combined_loader import _shutdown_workers_and_reset_iterator

    assert parameters(_shutdown_workers_and_reset_iterator) == ("dataloader",)
    trainer = bare_trainer(max_steps=1)
    assert seams.pending_loader_states(trainer) == [] and seams.training_loaders(trainer) is None
    trainer.fit_loop.on_load_checkpoint({"combined_loader": [{"batches": 3}]})
    assert seams.pending_loader_states(trainer) == [{"batches": 3}]
    loader = DataLoader(list(range(4)))
    iter(loader)
    seams.shutdown_loader_workers(loader)


@pytest.mark.parametrize("function, name", [
    (seams.pending_loader_states, "_combined_loader_states_to_load"),
    (seams.training_loaders, "_combined_loader"),
    (seams.apply_pending_loader_states, "_data_fetcher"),
])
def test_a_missing_fit_loop_member_names_the_lightning_version(function, name) -> None:
    trainer = bare_trainer(max_steps=1)
    delattr(trainer.fit_loop, name)
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + rf" \(_FitLoop\.{name}\)"):
        function(trainer)


def test_a_missing_shutdown_helper_names_the_lightning_version(monkeypatch) -> None:
    import lightning.pytorch.utilities.combined_loader as combined_loader

    monkeypatch.delattr(combined_loader, "_shutdown_workers_and_reset_iterator")
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(.*_shutdown_workers_and_reset_iterator\)"):
        seams.shutdown_loader_workers(DataLoader([1]))


# -- the LightningModule, precision and DDP -------------------------------------------------------------------------
def test_attached_trainer_reads_the_module_trainer_reference() -> None:
    module = pl.LightningModule()
    assert seams.attached_trainer(module) is None
    trainer = bare_trainer(max_steps=1)
    module.trainer = trainer
    assert seams.attached_trainer(module) is trainer
    del module.__dict__["_trainer"]
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(LightningModule\._trainer\)"):
        seams.attached_trainer(module)


def test_grad_scale_is_the_grad_scaler_scale_of_16_mixed_and_1_otherwise() -> None:
    assert "scaler" in vars(MixedPrecision("16-mixed", "cpu"))  # what Trainer.scaler reads
    assert isinstance(inspect.getattr_static(pl.Trainer, "scaler"), property)
    fp16 = bare_trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=8.0))])
    assert fp16.precision == "16-mixed" and seams.grad_scale(fp16) == 8.0
    assert seams.grad_scale(bare_trainer()) == 1.0
    assert seams.grad_scale(bare_trainer(precision="bf16-mixed")) == 1.0


def test_16_mixed_without_a_visible_scaler_is_an_error(monkeypatch) -> None:
    trainer = bare_trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    monkeypatch.setattr(pl.Trainer, "scaler", property(lambda self: None))
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(MixedPrecision\.scaler\)"):
        seams.grad_scale(trainer)


def test_ddp_ignore_list_seam_marks_the_module_ddp_reads(monkeypatch) -> None:
    assert parameters(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model) == (
        "module", "params_and_buffers_to_ignore")
    assert "module._ddp_params_and_buffers_to_ignore" in source(DistributedDataParallel.__init__)
    module = torch.nn.Linear(2, 2)
    module.register_buffer("shard", torch.zeros(3))
    seams.ignore_in_ddp(module, ["shard"])
    assert list(module._ddp_params_and_buffers_to_ignore) == ["shard"]
    monkeypatch.delattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    with pytest.raises(RuntimeError, match=TORCH_ERROR):
        seams.ignore_in_ddp(module, ["shard"])


# -- the CLI --------------------------------------------------------------------------------------------------------
def test_trainer_integer_or_fraction_arguments_are_unions_rewritten_int_first() -> None:
    annotations = pl.Trainer.__init__.__annotations__
    for name in seams.INTEGER_OR_FRACTION_ARGUMENTS:
        assert not isinstance(annotations[name], str), name
        assert {int, float} <= set(typing.get_args(annotations[name])), name
    seams.parse_integer_limits_as_counts()
    for name in seams.INTEGER_OR_FRACTION_ARGUMENTS:
        args = typing.get_args(annotations[name])
        assert args.index(int) < args.index(float), name


def test_a_string_annotation_is_an_error_not_a_silent_no_op(monkeypatch) -> None:
    monkeypatch.setitem(pl.Trainer.__init__.__annotations__, "limit_val_batches", "Optional[Union[int, float]]")
    with pytest.raises(RuntimeError, match=LIGHTNING_ERROR + r" \(it is 'Optional\[Union\[int, float\]\]'\)"):
        seams.parse_integer_limits_as_counts()


def test_lightning_cli_reads_checkpoint_hyperparameters_between_the_two_hooks_the_cli_uses() -> None:
    """TasksCLI resolves ``--ckpt_path last`` in ``parse_arguments`` and puts typed options back in
    ``before_instantiate_classes``: LightningCLI must read the checkpoint's hyperparameters in between."""
    init = source(LightningCLI.__init__)
    order = [init.index(call) for call in ("self.parse_arguments(", "self._parse_ckpt_path()",
                                           "self.before_instantiate_classes()", "self.instantiate_classes()")]
    assert order == sorted(order)
    assert "self.config = self.parser.parse_object(hparams, self.config)" in source(LightningCLI._parse_ckpt_path)


# -- torch's DataLoader (datamodules/loaders.py) --------------------------------------------------------------------
def test_dataloader_iterators_draw_from_the_index_sampler_property(monkeypatch) -> None:
    assert isinstance(inspect.getattr_static(DataLoader, "_index_sampler"), property)
    assert "loader._index_sampler" in source(_BaseDataLoaderIter.__init__)
    loader = ResumableDataLoader(list(range(6)), batch_size=2)
    assert list(torch_index_sampler(loader)) == [[0, 1], [2, 3], [4, 5]]
    monkeypatch.delattr(DataLoader, "_index_sampler")
    with pytest.raises(RuntimeError, match=r"needs torch's DataLoader\._index_sampler property .*" + TORCH_ERROR):
        iter(loader)


# -- torchmetrics (lit_tasks/metrics/verification.py overrides it) --------------------------------------------------
def test_torchmetrics_sync_dist_keeps_the_signature_verification_metric_overrides() -> None:
    assert parameters(torchmetrics.Metric._sync_dist) == ("self", "dist_sync_fn", "process_group")
    assert "self._sync_dist(" in source(torchmetrics.Metric.sync)
