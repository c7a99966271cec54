"""Where the reference files of ../shared/golden are: $LIT_TASKS_SHARED, else the shared folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """$LIT_TASKS_SHARED when set, else ``../shared`` beside the checkout (CI's layout)."""
    if os.environ.get("LIT_TASKS_SHARED"):
        return Path(os.environ["LIT_TASKS_SHARED"])
    return ROOT.parent / "shared"


def golden_dir(name: str) -> Path | None:
    """``shared/golden/<name>`` when it holds its ``values.json``, else None."""
    folder = shared_dir() / "golden" / name
    return folder if (folder / "values.json").is_file() else None
