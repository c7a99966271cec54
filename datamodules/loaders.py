"""A DataLoader that remembers where it is in an epoch, so a fit resumed from a mid-epoch checkpoint continues there.

Lightning saves the ``state_dict()`` of every training loader that has one in each checkpoint and hands it back
to ``load_state_dict()`` before the resumed fit iterates (``fit --ckpt_path ...``). A plain DataLoader has none:
Lightning then restarts the interrupted epoch's data from a fresh order while counting the batches already done,
so the resumed epoch silently repeats some samples and never reaches others. :class:`ResumableDataLoader` saves

* ``batches``: batches handed out in the current pass (an epoch of this loader);
* ``seed``: the seed of the pass's shuffled order. The loader reseeds its ``generator`` from torch's global
  generator at the start of every pass (what ``RandomSampler`` does without a generator) and keeps the seed;
  a ``DistributedSampler``'s order depends on its epoch only, which is saved too;
* for an ``IterableDataset`` that supports it (:class:`datamodules.tfrecord.TFRecordDataset` with index files),
  the dataset's epoch, and on restore the dataset skips, in each DataLoader worker, the records of the batches
  that worker had delivered (without decoding them).

and on restore the next pass replays the same order and skips the batches already trained on, at the sampler
(map-style: indices only, no sample is loaded) or in the dataset: the resumed epoch neither repeats nor skips a
sample. With ``num_workers=0`` the order and the batches are exactly those of an uninterrupted run; with workers,
an iterable dataset's remaining batches can come in another worker interleaving (the same batches), and random
augmentations drawn in worker processes are not part of the saved state. When the position cannot be restored
(the batch size, the number of processes or workers, or the dataset length changed; an iterable dataset without
position support) the loader says so and what the resumed epoch will do.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from datamodules.transfer import PackSmall, unpack_small

SUPPORTED_TORCH = "torch>=2.4,<2.15"  # as pyproject.toml pins it (tests/test_lightning_seams.py checks they agree)


def torch_index_sampler(loader: DataLoader) -> Any:
    """DataLoader's private ``_index_sampler`` property of ``loader`` (the sampler its iterators draw indices from).

    The one private torch member of ``datamodules`` (it cannot use :mod:`lit_tasks.run.lightning_seams`): no public
    hook lets a DataLoader start a pass mid-way. Raises RuntimeError naming the installed torch when DataLoader has
    no such property; ``tests/test_lightning_seams.py`` also checks that torch's iterators still read it.
    """
    seam = inspect.getattr_static(DataLoader, "_index_sampler", None)
    if not isinstance(seam, property):
        raise RuntimeError(f"datamodules.loaders.ResumableDataLoader needs torch's DataLoader._index_sampler property "
                           f"(its iterators draw indices from it), which the installed torch {torch.__version__} "
                           f"lacks: a resumed epoch would repeat samples. Supported range: {SUPPORTED_TORCH} "
                           "(pyproject.toml)")
    return seam.fget(loader)


class _SkipFirst:
    """Index sampler wrapper whose next pass starts at the loader's (restored) position.

    Its ``__iter__`` is a generator, so the pass begins (seed drawn, sampler iterated) at the first batch
    request, as ``RandomSampler`` would; DataLoader worker processes request ahead, the single-process loader
    exactly when the trainer asks for the first batch.
    """

    def __init__(self, loader: "ResumableDataLoader", inner: Any) -> None:
        self.loader, self.inner = loader, inner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skip = self.loader._begin_pass()
        iterator = iter(self.inner)
        for _ in range(skip):
            if next(iterator, None) is None:
                return
        yield from iterator


class _CountingIterator:
    """The DataLoader's iterator, counting the batches it hands out into the loader's position."""

    def __init__(self, loader: "ResumableDataLoader", inner: Iterator[Any]) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._position += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)


class _Unpacking:
    """A DataLoader iterator whose batches left the workers packed (:class:`~datamodules.transfer.PackSmall`)."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner = inner

    def __iter__(self) -> "_Unpacking":
        return self

    def __next__(self) -> Any:
        return unpack_small(next(self.inner))

    def __len__(self) -> int:
        return len(self.inner)


class TransferDataLoader(DataLoader):
    """DataLoader that rebuilds the small tensors a :class:`~datamodules.transfer.PackSmall` collate packed in the
    workers, so its batches are plain tensors again (see :mod:`datamodules.transfer` for why they are packed)."""

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        return _Unpacking(iterator) if isinstance(self.collate_fn, PackSmall) else iterator


class ResumableDataLoader(TransferDataLoader):
    """``torch.utils.data.DataLoader`` with ``state_dict()`` / ``load_state_dict()`` of its position in an epoch.

    Same arguments as DataLoader; give it a ``generator`` (``torch.Generator()``) when shuffling so the order of
    each pass is reproducible from the saved seed (the generator is reseeded at every pass). See the module
    docstring for what is saved and what a restore does.
    """

    # -- bookkeeping (plain attributes, created lazily: the signature stays DataLoader's for Lightning) --------
    @property
    def _position(self) -> int:
        return self.__dict__.get("_resume_position", 0)

    @_position.setter
    def _position(self, value: int) -> None:
        self.__dict__["_resume_position"] = value

    @property
    def _index_sampler(self) -> Any:
        """Override of DataLoader's private property (:func:`torch_index_sampler`): the pass starts at the position."""
        inner = torch_index_sampler(self)
        if isinstance(self.dataset, IterableDataset):
            return inner
        wrapper = self.__dict__.get("_resume_skipper")
        if wrapper is None or wrapper.inner is not inner:
            wrapper = self.__dict__["_resume_skipper"] = _SkipFirst(self, inner)
        return wrapper

    def _begin_pass(self) -> int:
        """Start a pass of the map-style order: seed the generator, return how many batches to skip."""
        restore = self.__dict__.pop("_resume_restore", None)
        seed = restore["seed"] if restore and restore.get("seed") is not None else None
        if self.generator is not None:
            if seed is None:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self.generator.manual_seed(seed)
        self.__dict__["_resume_seed"] = seed
        skip = restore["batches"] if restore else 0
        self._position = skip
        return skip

    def __iter__(self) -> Any:
        if isinstance(self.dataset, IterableDataset):
            restore = self.__dict__.pop("_resume_restore", None)
            self._position = restore["batches"] if restore else 0
        else:
            torch_index_sampler(self)  # fails loudly on a torch without the seam (the override would never be called)
            self._position = 0  # set again when the pass begins (at its first batch)
        return _CountingIterator(self, super().__iter__())

    # -- Lightning's stateful-loader protocol -------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        try:
            length = len(self)
        except TypeError:
            length = None
        sampler = self.sampler
        return {"length": length, "batch_size": self.batch_size, "num_workers": self.num_workers,
                "num_replicas": getattr(sampler, "num_replicas", 1), "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """``{"batches", "seed", "sampler_epoch", "dataset_epoch", layout...}`` of the pass in progress."""
        state = {"batches": self._position, "seed": self.__dict__.get("_resume_seed"),
                 "sampler_epoch": getattr(self.sampler, "epoch", None), **self._layout()}
        epoch_in_progress = getattr(self.dataset, "epoch_in_progress", None)
        state["dataset_epoch"] = epoch_in_progress() if callable(epoch_in_progress) else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue the saved one (or say why it cannot)."""
        batches = int(state.get("batches", 0))
        layout, saved = self._layout(), {k: state.get(k) for k in self._layout()}
        if batches == 0 or (saved["length"] is not None and batches >= saved["length"]):
            return  # saved at the start or the end of a pass: the next pass is a fresh one
        if layout != saved:
            changed = ", ".join(f"{k} {saved[k]} -> {layout[k]}" for k in layout if layout[k] != saved[k])
            rank_zero_warn(f"resuming mid-epoch after {batches} batches, but the training loader changed ({changed}): "
                           "the position cannot be restored, so the rest of this epoch is drawn from a fresh order "
                           "(some samples may repeat and others be left out until the next epoch)")
            return
        if isinstance(self.dataset, IterableDataset):
            resume = getattr(self.dataset, "resume_position", None)
            if not callable(resume) or state.get("dataset_epoch") is None or saved["length"] is None:
                rank_zero_warn(f"resuming mid-epoch after {batches} batches of {type(self.dataset).__name__}, which "
                               "cannot restore a position: the resumed epoch re-reads its records from the start "
                               "(records before the interruption are seen twice this epoch)")
                return
            resume(int(state["dataset_epoch"]), batches, self.num_workers, self.batch_size, self.drop_last)
            self.__dict__["_resume_restore"] = {"batches": batches}
            rank_zero_info(f"resuming the training data mid-epoch: epoch {state['dataset_epoch']} of "
                           f"{type(self.dataset).__name__} continues after its first {batches} batches (the records "
                           "before are skipped undecoded)")
            return
        if state.get("sampler_epoch") is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(state["sampler_epoch"]))  # workers draw indices before Lightning sets it
        self.__dict__["_resume_restore"] = {"batches": batches, "seed": state.get("seed")}
        rank_zero_info(f"resuming the training data mid-epoch: the epoch's order is replayed and its first {batches} "
                       f"of {saved['length']} batches, already trained on, are skipped")
