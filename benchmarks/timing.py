"""The one timing helper of ``benchmarks/``: warm-up, repeats interleaved round by round, wall and CPU clocks, median.

Cases compared in one run are timed alternately, round by round (the order reversed every other round unless
``alternate=False``), so load from other processes hits every case alike. Every timed call reports its wall time and
this process's CPU time (all threads), which a busy machine disturbs less. ``sync=True`` waits for queued GPU work
before and after each timed call, so a wall time covers it.

    from timing import time_call, time_calls  # benchmarks/ is on the path when a script runs

    step = time_call(train_step, warmup=1, repeats=5).median  # seconds
    times = time_calls({"ours": ours, "reference": ref}, warmup=1, repeats=5)
    print(times["ours"].median / times["reference"].median)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU and before CUDA is initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall and process CPU seconds of a block: ``with Stopwatch() as watch: ...``, then ``watch.wall`` / ``watch.cpu``.

    ``start()`` and ``stop()`` work outside a ``with`` too; each ``stop()`` measures from the start (a lap).
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.wall = self.cpu = 0.0
        self._wall_start: float | None = None
        self._cpu_start = 0.0

    def start(self) -> Stopwatch:
        """Start (or restart) the clocks."""
        if self.sync:
            synchronize()
        self._wall_start, self._cpu_start = time.perf_counter(), time.process_time()
        return self

    def stop(self) -> Stopwatch:
        """Seconds since :meth:`start` into ``wall`` and ``cpu``."""
        if self._wall_start is None:
            raise RuntimeError("Stopwatch.stop() before start()")
        if self.sync:
            synchronize()
        self.wall = time.perf_counter() - self._wall_start
        self.cpu = time.process_time() - self._cpu_start
        return self

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call of one case: ``wall`` and this process's ``cpu`` time, in call order."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        """Median process CPU seconds."""
        return statistics.median(self.cpu)

    @property
    def best(self) -> float:
        """Fastest wall seconds (other processes only ever slow a call down)."""
        return min(self.wall)

    @property
    def mean(self) -> float:
        """Mean wall seconds."""
        return statistics.fmean(self.wall)


def time_calls(
    calls: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    per_round: int = 1,
    alternate: bool = True,
    sync: bool = False,
) -> dict[str, Timing]:
    """Time every case of ``calls`` alternately: ``warmup`` untimed calls each, then ``repeats`` rounds.

    In each round every case runs ``per_round`` consecutive timed calls (e.g. the frames of a stream), the cases in
    the given order, reversed every other round when ``alternate``. Returns each case's :class:`Timing`.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    watch = Stopwatch(sync)
    for r in range(repeats):
        for name in (names if r % 2 == 0 or not alternate else names[::-1]):
            for _ in range(per_round):
                with watch:
                    calls[name]()
                wall[name].append(watch.wall)
                cpu[name].append(watch.cpu)
    return {name: Timing(tuple(wall[name]), tuple(cpu[name])) for name in names}


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, sync: bool = False) -> Timing:
    """``warmup`` untimed calls of ``fn``, then ``repeats`` timed ones: their :class:`Timing`."""
    return time_calls({"": fn}, warmup=warmup, repeats=repeats, sync=sync)[""]
