"""Batches leave DataLoader workers with their small tensors pickled (datamodules/transfer.py) and come back equal."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import torch

from datamodules.transfer import SMALL_BYTES, Small, pack_small, unpack_small

Pair = namedtuple("Pair", "a b")


def leaves(batch):
    if isinstance(batch, dict):
        return [x for v in batch.values() for x in leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [x for v in batch for x in leaves(v)]
    return [batch]


def test_round_trip_keeps_dtype_shape_values_and_containers():
    g = torch.Generator().manual_seed(0)
    large = torch.rand(16, 3, 64, 64, generator=g)  # 786 kB: stays a tensor (shared memory)
    batch = {
        "images": large,
        "targets": [{"boxes": torch.rand(3, 4, generator=g), "labels": torch.tensor([1, 0, 2]),
                     "iscrowd": torch.tensor([False, True, False]), "mask": torch.randint(0, 255, (8, 8), dtype=torch.uint8,
                                                                                         generator=g),
                     "half": torch.rand(5, generator=g).half(), "bf16": torch.rand(5, generator=g).bfloat16(),
                     "empty": torch.zeros(0, 4), "name": "a.jpg", "scale": 1.5}],
        "pair": Pair(torch.arange(4), np.arange(3)),
    }
    packed = pack_small(batch)
    assert packed["images"] is large
    target = packed["targets"][0]
    assert all(isinstance(target[k], Small) for k in ("boxes", "labels", "iscrowd", "mask", "half", "empty"))
    assert torch.is_tensor(target["bf16"])  # NumPy has no bfloat16: travels as a tensor
    assert isinstance(packed["pair"], Pair) and isinstance(packed["pair"].b, np.ndarray)  # the dataset's own array
    restored = unpack_small(packed)
    for key, value in batch["targets"][0].items():
        got = restored["targets"][0][key]
        if torch.is_tensor(value):
            assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)
        else:
            assert got == value
    assert isinstance(restored["pair"], Pair) and torch.equal(restored["pair"].a, torch.arange(4))
    assert isinstance(restored["pair"].b, np.ndarray)  # NumPy arrays the dataset returned are not turned into tensors


def test_the_size_limit():
    at = torch.zeros(SMALL_BYTES // 4, dtype=torch.float32)
    above = torch.zeros(SMALL_BYTES // 4 + 1, dtype=torch.float32)
    assert isinstance(pack_small(at), Small) and pack_small(above) is above


def test_loaders_with_workers_give_the_batches_of_the_trainer_process():
    """A detection validation loader with 2 workers: the same batches as without workers, as plain tensors, and
    only the image tensor crossed by shared memory."""
    from datamodules import ShapesDetectionDataModule

    batches = {}
    for workers in (0, 2):
        dm = ShapesDetectionDataModule(num_train=8, num_val=10, image_size=64, batch_size=4, num_workers=workers)
        dm.setup("validate")
        loader = dm.val_dataloader()
        batches[workers] = list(loader)
        if workers:
            samples = [loader.dataset[i] for i in range(4)]
            crossing = [x for x in leaves(loader.collate_fn(samples)) if torch.is_tensor(x)]
            assert len(crossing) == 1 and crossing[0].shape == (4, 3, 64, 64)
    assert len(batches[0]) == len(batches[2]) == 3
    for plain, moved in zip(batches[0], batches[2]):
        a, b = leaves(plain), leaves(moved)
        assert len(a) == len(b) and not any(isinstance(x, Small) for x in b)
        for x, y in zip(a, b):
            assert type(x) is type(y)
            if torch.is_tensor(x):
                assert x.dtype == y.dtype and torch.equal(x, y)
