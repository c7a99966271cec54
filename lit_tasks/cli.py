"""`lit-tasks fit|validate|test|predict`: LightningCLI over every task and DataModule.

A config names the task and the DataModule by class path (``model.class_path: lit_tasks.DetectionTask``,
``data.class_path: datamodules.COCODetectionDataModule``); ``lit-tasks fit --config X.yaml --help`` lists
every option of the classes it names, ``--model.help CLASS`` those of any class. Sizes the data
determines (``num_classes``, ``num_identities``, ``num_keypoints``, ``class_names``, ``ignore_index``; for face
recognition the ``verification_sets`` names and the ``image_size`` the network is built for; for pose also
``keypoint_names``, ``flip_index``, ``skeleton``, ``oks_sigmas``, ``input_size``; for online action detection
``feature_dim``, ``background_index``, ``ambiguous_index`` and the window sizes ``window`` / ``num_future`` the
DataModule cuts) are linked from the DataModule into the task at instantiation, so a config states them once, for
the data; a different value given for the task (on the command line, in a config or from a checkpoint) is an
error, not silently replaced. Defaults: TensorBoard logging to ``lightning_logs/``, a checkpoint of the
best epoch on the task's ``monitor`` metric plus ``last.ckpt``, and an LR monitor.

Every run also writes checkpoints crash-safely (:class:`~lit_tasks.run.checkpoint_io.AtomicCheckpointIO`) and
restores on resume what Lightning does not: random generators and the training data position
(:class:`~lit_tasks.run.resume.ExactResume`). ``fit --ckpt_path last`` resumes from the newest ``last.ckpt`` of
the run's versions (in the logger's folder, or ``--checkpoint.dirpath``) and goes on logging in that version's
folder; when there is none it says where it looked and starts from the beginning
(:mod:`lit_tasks.run.last_checkpoint`). The CLI uses no private Lightning member: see :class:`TasksCLI`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_tasks.run.checkpoint_io import install_atomic_checkpoint_io
from lit_tasks.run.callbacks import LRMonitor, TaskCheckpoint
from lit_tasks.run.last_checkpoint import continue_logging_in, resolve_last_checkpoint
from lit_tasks.run.lightning_seams import parse_integer_limits_as_counts
from lit_tasks.run.resume import ExactResume

LINKED_SIZES = ("num_classes", "num_identities", "num_keypoints", "class_names", "ignore_index", "verification_sets",
                # face recognition: the side of the square images the network is built for
                "image_size",
                # pose: the keypoint set and the crop size the data gives
                "keypoint_names", "flip_index", "skeleton", "oks_sigmas", "input_size",
                # online action detection: the feature width, the special classes and the windows the data cuts
                "feature_dim", "background_index", "ambiguous_index", "window", "num_future")


class FitConfigCallback(SaveConfigCallback):
    """Save the run's config.yaml for ``fit`` only; evaluating a checkpoint must not touch the training run's files."""

    resuming: bool = False  # set by the CLI when fit resumes in an earlier run's folder

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir
        if self.resuming and log_dir and os.path.isfile(os.path.join(log_dir, self.config_filename)):
            # The run's config.yaml stays; the resumed run's config goes beside it.
            stem, ext = os.path.splitext(self.config_filename)
            k = 1
            while os.path.exists(os.path.join(log_dir, f"{stem}.resume{k}{ext}")):
                k += 1
            self.config_filename = f"{stem}.resume{k}{ext}"
        super().setup(trainer, pl_module, stage)


class TasksCLI(LightningCLI):
    """LightningCLI with the project's links and default callbacks.

    Its overrides, all of public LightningCLI hooks: ``add_arguments_to_parser`` (the checkpoint and LR monitor
    callbacks, the size links); ``parse_arguments`` (``--help`` lists the chosen classes' options; resolves
    ``--ckpt_path last`` and notes the model options typed on the command line, before LightningCLI reads the
    checkpoint's hyperparameters into the config); ``before_instantiate_classes`` (after that read: typed options win
    over the checkpoint's, unknown checkpoint keys are dropped, a resumed fit's logger gets the run's ``version``);
    ``instantiate_classes`` (refuses a linked size that differs from the data's); ``instantiate_trainer`` (atomic
    checkpoint writes, ExactResume); ``before_fit`` / ``before_validate`` / ``before_test`` (a resumed fit's config
    goes beside the run's; evaluating untrained weights warns).
    """

    _resumed_from: str | None = None  # the last.ckpt ``--ckpt_path last`` resolved to
    _typed_model_options: dict[str, Any] = {}  # model options typed on the command line, as parsed

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # A link whose source or target the chosen classes lack is skipped by jsonargparse.
        for name in LINKED_SIZES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI, but ``--help`` also documents the options of the task and DataModule classes; then
        resolves ``--ckpt_path last`` and keeps the model options typed on the command line."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        if not any(a in ("-h", "--help") for a in argv) or not argv or argv[0] not in self.subcommands():
            super().parse_arguments(parser, args)
            self._before_checkpoint_hyperparameters(argv)
            return
        try:
            super().parse_arguments(parser, args)
        except SystemExit:
            for key, class_path in classes_named(argv):
                print(f"\n======== options of {class_path} (--{key}.*) ========")
                try:
                    parser.parse_args([argv[0], f"--{key}.help", class_path])
                except SystemExit:
                    pass
            raise

    def _before_checkpoint_hyperparameters(self, argv: list[str]) -> None:
        """Resolve ``--ckpt_path last`` to a file (:func:`resolve_last_checkpoint`), so LightningCLI reads that
        checkpoint's hyperparameters, and keep the model options typed on the command line."""
        subcommand = self.config.get("subcommand")
        self._resumed_from, self._typed_model_options = None, {}
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            self._resumed_from = config["ckpt_path"] = resolve_last_checkpoint(config, subcommand)
        init_args = config.get("model.init_args")
        self._typed_model_options = {name: init_args[name] for name in command_line_model_options(argv)
                                     if init_args is not None and name in init_args}

    def before_instantiate_classes(self) -> None:
        """After LightningCLI put the checkpoint's hyperparameters in the config (the checkpoint rebuilds the model it
        holds): model options typed on the command line win over the checkpoint's (``test --ckpt_path X
        --model.score_threshold 0.3`` tests with 0.3; config files and defaults still yield to the checkpoint), keys
        the task does not take are dropped, and a fit resumed with ``--ckpt_path last`` logs in its run's folder."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        drop_unknown_checkpoint_arguments(config)
        if self._typed_model_options:
            init_args = config["model.init_args"]
            for name, value in self._typed_model_options.items():
                if name in init_args and init_args[name] != value:
                    rank_zero_info(f"--model.{name}={value!r} from the command line replaces the checkpoint's "
                                   f"{init_args[name]!r}")
                init_args[name] = value
        if subcommand == "fit" and self._resumed_from:
            continue_logging_in(config, self._resumed_from)

    def instantiate_classes(self) -> None:
        """As LightningCLI, then refuse a task value of a linked size that differs from the DataModule's.

        jsonargparse overwrites link targets silently: ``--model.num_classes 9`` with a 5-class dataset, or a
        checkpoint trained on other labels, would otherwise run as if nothing were wrong.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        init_args = config.get("model.init_args") or {}
        given = {name: init_args[name] for name in LINKED_SIZES if name in init_args}
        super().instantiate_classes()
        check_linked_values(given, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """As LightningCLI, plus crash-safe checkpoint writes and random generator states in checkpoints."""
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_checkpoint_io(trainer)
        if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
            trainer.callbacks.append(ExactResume())
        return trainer

    def before_fit(self) -> None:
        """A fit resumed with ``--ckpt_path last`` writes its config.yaml beside the run's."""
        if not self._resumed_from:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, FitConfigCallback):
                callback.resuming = True

    def _warn_if_untrained(self) -> None:
        # A model built with --model.pretrained_weights holds published weights: evaluating them is the point.
        if self.config[self.subcommand].get("ckpt_path") is None and not self.model.hparams.get("pretrained_weights"):
            rank_zero_warn(
                "\n" + "!" * 78 + f"\n`lit-tasks {self.subcommand}` without --ckpt_path evaluates the model as "
                "built from the config: freshly initialised, UNTRAINED weights.\nPass --ckpt_path "
                "path/to/checkpoint.ckpt to evaluate a trained model.\n" + "!" * 78,
                category=UserWarning,
            )

    def before_validate(self) -> None:
        self._warn_if_untrained()

    def before_test(self) -> None:
        self._warn_if_untrained()


def drop_unknown_checkpoint_arguments(config: Any) -> None:
    """Drop the checkpoint's hyperparameters the model class does not take (with a warning naming them).

    Checkpoints written before tasks kept only their own arguments could hold a DataModule value the CLI linked
    (e.g. an identity DataModule's ``class_names`` in a face checkpoint); LightningCLI passes such keys on as
    ``dict_kwargs`` and the task's ``__init__`` refuses them.
    """
    model = config.get("model")
    extra = model.get("dict_kwargs") if model is not None and hasattr(model, "get") else None
    class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
    if not extra or not class_path:
        return
    module, _, name = class_path.rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    unknown = [k for k in extra if k not in parameters]
    for key in unknown:
        extra.pop(key)
    if unknown:
        rank_zero_warn(f"ignoring {unknown} from the checkpoint's hyperparameters: {class_path} takes no such argument")


def check_linked_values(given: dict[str, Any], model: pl.LightningModule, datamodule: Any) -> None:
    """Raise if a value given for the task's linked argument (not its default) differs from the DataModule's."""
    parameters = inspect.signature(type(model).__init__).parameters
    for name, value in given.items():
        if name not in parameters or not hasattr(datamodule, name) or value == parameters[name].default:
            continue
        linked = getattr(datamodule, name)
        if value != linked:
            shown = lambda v: v if not isinstance(v, list) or len(v) <= 8 else f"{v[:8]}... ({len(v)} entries)"  # noqa: E731
            raise ValueError(
                f"model {name}={shown(value)!r} (from the command line, a config or the checkpoint) differs from the "
                f"DataModule's {name}={shown(linked)!r}: {name} is linked from the data (--data.{name}); a model "
                f"built for other data (labels, sizes) cannot be used on this data as it is")


def command_line_model_options(argv: list[str]) -> list[str]:
    """Names of the task's init arguments set by ``--model.NAME`` / ``--model.init_args.NAME[.sub]`` in ``argv``."""
    names = []
    for arg in argv:
        if not arg.startswith("--model."):
            continue
        parts = arg[len("--model."):].partition("=")[0].split(".")
        if parts[0] == "init_args":
            parts = parts[1:]
        if parts and parts[0] and parts[0] not in ("help", "class_path", "dict_kwargs"):
            names.append(parts[0])
    return list(dict.fromkeys(names))


def classes_named(argv: list[str]) -> list[tuple[str, str]]:
    """(``model``|``data``, class path) named by ``--config`` files or ``--model``/``--data``; all known ones if none."""
    found: dict[str, list[str]] = {"model": [], "data": []}
    for i, arg in enumerate(argv):
        key, _, value = arg.lstrip("-").partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key == "config" and os.path.isfile(value):
            with open(value) as f:
                config = yaml.safe_load(f) or {}
            for part in found:
                path = (config.get(part) or {}).get("class_path") if isinstance(config.get(part), dict) else None
                if path:
                    found[part].append(path)
        elif key in found and value and not value.startswith("-"):
            found[key].append(value)
    if not found["model"]:
        import lit_tasks

        found["model"] = [f"lit_tasks.{n}" for n in lit_tasks.__all__ if n != "BaseTask"]
    if not found["data"]:
        import datamodules

        found["data"] = [f"datamodules.{n}" for n in getattr(datamodules, "__all__", []) if n.endswith("DataModule")
                         and n != "BaseDataModule"]
    return [(part, path) for part in ("model", "data") for path in dict.fromkeys(found[part])]


def run_cli(args: list[str] | None = None, run: bool = True) -> TasksCLI:
    """Build (and by default run) the CLI; returns it so Python callers can reach ``.model``/``.trainer``."""
    parse_integer_limits_as_counts()
    return TasksCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": ".", "name": "lightning_logs"},
            }
        },
        save_config_callback=FitConfigCallback,
        save_config_kwargs={"overwrite": False},  # never replace a config.yaml that is already there
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-tasks`` console script (returns None so the exit status is 0)."""
    run_cli(args)


if __name__ == "__main__":  # `python -m lit_tasks.cli ...` (e.g. under `torchrun -m`): LightningCLI reads sys.argv
    main()
