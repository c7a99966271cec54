"""benchmarks/timing.py, the one timing helper of the benchmarks: warm-up, interleaved rounds, clocks, statistics."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_timing():
    spec = importlib.util.spec_from_file_location("timing", ROOT / "benchmarks" / "timing.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(module)
    return module


def test_time_calls_warms_up_then_alternates_rounds() -> None:
    timing = load_timing()
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = timing.time_calls(cases, warmup=2, repeats=3, per_round=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    assert "".join(calls[6:]) == "aabbcc" "ccbbaa" "aabbcc"  # every other round reversed
    assert all(len(t.wall) == len(t.cpu) == 6 for t in times.values())
    calls.clear()
    timing.time_calls(cases, warmup=0, repeats=2, alternate=False)
    assert "".join(calls) == "abcabc"


def test_timing_statistics_and_stopwatch() -> None:
    timing = load_timing()
    t = timing.Timing(wall=(3.0, 1.0, 2.0), cpu=(1.0, 1.0, 4.0))
    assert (t.median, t.median_cpu, t.best, t.mean) == (2.0, 1.0, 1.0, 2.0)
    with timing.Stopwatch() as watch:
        sum(range(10000))
    assert watch.wall > 0 and watch.cpu >= 0
    assert len(timing.time_call(lambda: None, warmup=0, repeats=4).wall) == 4
    with pytest.raises(RuntimeError, match="before start"):
        timing.Stopwatch().stop()
