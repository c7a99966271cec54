"""Running a function in several CPU processes (gloo) for the DDP tests: a free port and a spawned group."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_processes(fn: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group (spawn, not fork:
    forking a process whose OpenMP/gloo threads run can deadlock the child). ``fn`` must be importable
    (module level), and reports back through files."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")
