"""Cheap worker-to-trainer transfer of batches made of many small tensors.

A DataLoader worker hands each tensor of a batch to the trainer process through its own shared-memory segment and
file descriptor. A detection batch of 16 images carries ~160 tensors (per image: boxes, labels, sizes, ids, crowd
flags, the original annotations), and that transfer, not the loading, set the pace: on 2 CPU cores a shapes batch
took 420 ms to arrive from one worker against 71 ms to build in the trainer process. Small tensors therefore travel
pickled as NumPy arrays inside :class:`Small` (a copy of a few bytes) and are turned back into tensors in the
trainer process; large ones (images, masks, feature windows) keep shared memory.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

SMALL_BYTES = 64 * 1024  # below this a pickled copy is cheaper than a shared-memory segment


class Small:
    """A small tensor in transit: its NumPy array (pickled inline), rebuilt by :func:`unpack_small`."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        return Small, (self.array,)


def _map(batch: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every leaf of nested dicts, lists and tuples (namedtuples kept)."""
    if isinstance(batch, dict):
        items = {k: _map(v, fn) for k, v in batch.items()}
        return items if type(batch) is dict else type(batch)(items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return fn(batch)


def _pack(value: Any) -> Any:
    if (torch.is_tensor(value) and value.device.type == "cpu" and value.layout == torch.strided
            and value.dtype != torch.bfloat16 and not value.requires_grad
            and value.numel() * value.element_size() <= SMALL_BYTES):
        return Small(value.numpy())
    return value


def _unpack(value: Any) -> Any:
    return torch.from_numpy(value.array) if isinstance(value, Small) else value


def pack_small(batch: Any) -> Any:
    """The batch with its small CPU tensors as :class:`Small` (run in the worker, after collation)."""
    return _map(batch, _pack)


def unpack_small(batch: Any) -> Any:
    """The batch with every :class:`Small` a tensor again (same dtype, shape and values)."""
    return _map(batch, _unpack)


class PackSmall:
    """``collate_fn`` wrapper for loaders with workers: collate, then :func:`pack_small`."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        return pack_small(self.collate_fn(samples))
