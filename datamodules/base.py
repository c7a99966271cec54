"""Shared DataModule plumbing: lazily built split datasets, loader construction and image padding.

Images leave every DataModule as float ``(3, H, W)`` in [0, 1] without mean/std normalisation: networks
normalise inside, so a trained (or exported) model takes plain [0, 1] images from any source.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.loaders import ResumableDataLoader, TransferDataLoader
from datamodules.transfer import PackSmall


# Splits each Trainer stage reads; predict runs on the validation split.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}


class BaseDataModule(pl.LightningDataModule):
    """Batch size, workers, lazily built split datasets and the four loaders shared by every DataModule.

    A subclass implements ``build_dataset(split)`` for ``"train"``, ``"val"``, ``"test"`` (and its
    ``predict_split``) and sets
    ``collate_fn`` (as a ``staticmethod``); ``setup(stage)`` builds only the splits that stage reads.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None
    predict_split: str = "val"  # the split `predict` reads; a DataModule with its own predict inputs names it

    def __init__(self, batch_size: int = 8, num_workers: int = 2, pin_memory: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.datasets: dict[str, Dataset] = {}

    def record_resolved(self, **values: Any) -> None:
        """Record ``values`` (sizes resolved from the data) in ``hparams`` and ``hparams_initial``, after
        ``save_hyperparameters()``.

        Under LightningCLI ``save_hyperparameters()`` records the parsed arguments (``num_classes: null``), not the
        resolved value the CLI links into the task, and Lightning refuses to log hyperparameters that differ between
        the task and the DataModule. ``save_hyperparameters`` given a dict stores exactly that dict.
        """
        self.save_hyperparameters({**self.hparams, **values})

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            self.dataset(self.predict_split if stage == "predict" else split)

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``, built on first use."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    @property
    def train_set(self) -> Dataset:
        """The training split (built on first use)."""
        return self.dataset("train")

    @property
    def val_set(self) -> Dataset:
        """The validation split (built on first use)."""
        return self.dataset("val")

    @property
    def predict_set(self) -> Dataset:
        """What ``predict`` reads (built on first use)."""
        return self.dataset(self.predict_split)

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("train"), train=True, collate_fn=self.collate_fn)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("val"), train=False, collate_fn=self.collate_fn)

    def test_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset("test"), train=False, collate_fn=self.collate_fn)

    def predict_dataloader(self) -> DataLoader:
        return self.make_loader(self.dataset(self.predict_split), train=False, collate_fn=self.collate_fn)

    def make_loader(
        self,
        dataset: Dataset,
        *,
        train: bool,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int | None = None,
        drop_last: bool | None = None,
    ) -> DataLoader:
        """A DataLoader with the module's settings; shuffles and drops the last batch only when training.

        Evaluation under DDP reads each sample exactly once (:func:`evaluation_sampler`): Lightning's default
        ``DistributedSampler`` repeats samples to even out the processes, and metrics would count them twice.
        The training loader is a :class:`~datamodules.loaders.ResumableDataLoader`: checkpoints remember its
        position in the epoch, and a fit resumed from one continues the epoch there. With workers, small tensors
        leave them pickled (:mod:`datamodules.transfer`) and the loader hands out tensors again.
        """
        if self.num_workers > 0:  # small tensors travel pickled; the loader's iterator rebuilds them
            collate_fn = PackSmall(collate_fn or torch.utils.data.default_collate)
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        sampler = None if train or iterable else evaluation_sampler(dataset)
        shuffle = train and not iterable
        return (ResumableDataLoader if train else TransferDataLoader)(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=train if drop_last is None else drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            generator=torch.Generator() if shuffle else None,  # reseeded per epoch; its seed goes in checkpoints
        )


def evaluation_sampler(dataset: Dataset) -> DistributedSampler | None:
    """Under DDP, a sampler giving each process every ``world``-th sample, none twice; None in one process.

    Processes then run different numbers of evaluation batches (by at most one), which is safe because
    evaluation steps make no collective call (losses reduce their normalisers only in training; metrics sync
    at ``compute``). Every process needs at least one sample: DDP broadcasts buffers on a process's first
    forward after training, and Lightning's epoch-end logging syncs every logged key.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    world = dist.get_world_size()
    if len(dataset) < world:
        raise ValueError(f"an evaluation set of {len(dataset)} samples cannot be split over {world} processes "
                         "(each needs at least one): evaluate with fewer devices")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=dist.get_rank(), shuffle=False)


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = 32) -> torch.Tensor:
    """Stack ``(3, H_i, W_i)`` images into ``(B, 3, H, W)``, zero-padding bottom/right to a multiple of ``size_divisor``."""
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h = (h + size_divisor - 1) // size_divisor * size_divisor
    w = (w + size_divisor - 1) // size_divisor * size_divisor
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return out
