"""`lit-tasks fit|validate|test|predict`: LightningCLI over every task and DataModule.

A config names the task and the DataModule by class path (``model.class_path: lit_tasks.DetectionTask``,
``data.class_path: datamodules.COCODetectionDataModule``); ``lit-tasks fit --config X.yaml --help`` lists
every option of the classes it names, ``--model.help CLASS`` those of any class. Sizes the data
determines (``num_classes``, ``num_identities``, ``num_keypoints``) are linked from the DataModule into
the task at instantiation. Defaults: TensorBoard logging to ``lightning_logs/``, a checkpoint of the
best epoch on the task's ``monitor`` metric plus ``last.ckpt``, and an LR monitor.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from lit_tasks.callbacks.defaults import LRMonitor, TaskCheckpoint

LINKED_SIZES = ("num_classes", "num_identities", "num_keypoints", "class_names")


class TasksCLI(LightningCLI):
    """LightningCLI with the project's links and default callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # A link whose source or target the chosen classes lack is skipped by jsonargparse.
        for name in LINKED_SIZES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def _warn_if_untrained(self) -> None:
        if self.config[self.subcommand].get("ckpt_path") is None:
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


def main(args: list[str] | None = None, run: bool = True) -> TasksCLI:
    """Entry point of the ``lit-tasks`` console script."""
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
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:] or None)
