"""The `lit-tasks` console entry point: exit status 0 on success (a returned object would make it 1)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_console_entry_exits_zero_and_main_returns_none(tmp_path):
    from lit_tasks.cli import main

    code = "import sys; from lit_tasks.cli import main; sys.exit(main(['fit', '--print_config']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainer:" in out.stdout
    assert main.__annotations__["return"] in ("None", None)


def test_every_config_is_run_by_some_test():
    """DESIGN.md: every YAML under configs/ goes through the CLI with fast_dev_run in some test file."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tests_text = "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    configs = sorted(p.name for p in (root / "configs").rglob("*.yaml"))
    assert len(configs) >= 10
    # A test that globs a folder names no file; those folders' tests assert their exact file sets instead.
    missing = [name for name in configs if name not in tests_text]
    assert not missing, f"configs no test names: {missing}"


def test_command_line_model_options_are_found_in_every_flag_form():
    from lit_tasks.cli import command_line_model_options

    argv = ["test", "--config", "x.yaml", "--model.init_args.score_threshold=0.3", "--model.nms_threshold", "0.5",
            "--model.init_args.optimizer.init_args.lr=1", "--model.class_path=lit_tasks.DetectionTask",
            "--model.help", "--data.init_args.batch_size=2", "--ckpt_path=c.ckpt", "--model.nms_threshold=0.4"]
    assert command_line_model_options(argv) == ["score_threshold", "nms_threshold", "optimizer"]


@pytest.mark.parametrize("given, expected", [("1", 1), ("3", 3), ("0.5", 0.5), ("1.0", 1.0)])
def test_integer_batch_limits_are_counts_whatever_order_typing_cached(given, expected, monkeypatch):
    """Python's typing cache can hand Lightning ``Union[float, int, None]`` (it did on a machine without ``rich``);
    jsonargparse then parsed "1" as 1.0 = every batch. Forced into that order here, "1" must still be one batch."""
    import typing

    import lightning.pytorch as pl

    from lit_tasks.cli import run_cli

    annotations = pl.Trainer.__init__.__annotations__
    for name in ("limit_train_batches", "val_check_interval"):
        monkeypatch.setitem(annotations, name, typing.Union[float, int, None])
    cli = run_cli(["--config", str(ROOT / "configs/face/arcface_synthetic.yaml"), f"--trainer.limit_train_batches={given}",
                   f"--trainer.val_check_interval={given}", "--data.num_workers=0"], run=False)
    for value in (cli.trainer.limit_train_batches, cli.trainer.val_check_interval):
        assert value == expected and type(value) is type(expected)
