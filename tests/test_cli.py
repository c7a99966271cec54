"""The `lit-tasks` console entry point: exit status 0 on success (a returned object would make it 1)."""

import subprocess
import sys


def test_console_entry_exits_zero_and_main_returns_none(tmp_path):
    from lit_tasks.cli import main

    code = "import sys; from lit_tasks.cli import main; sys.exit(main(['fit', '--print_config']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainer:" in out.stdout
    assert main.__annotations__["return"] in ("None", None)
