"""The argument block the TFRecord DataModules share: the shards of each split and how training reads them.

Every TFRecord DataModule keeps its own explicit, typed init signature (LightningCLI reads it) and forwards
these arguments by keyword to :class:`TFRecordShards`, which holds them and builds each split's dataset:

* ``train_files``, ``val_files``, ``test_files``: shard paths or glob patterns (``data/train-*.tfrecord``),
  plain, ``.gz`` or ``.zlib`` (told from the file); ``test_files`` defaults to ``val_files``. Indexes beside
  the shards (``python -m datamodules.tfrecord.index``) give exact epoch lengths and record-level balancing.
* ``shuffle_buffer``, ``seed``: the training shuffle (shard order per epoch + a buffer of this many records).
* ``on_corrupt``: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).

Training splits records across DDP ranks and workers with equal batch counts per rank (padding by
repetition); evaluation reads every record exactly once (:func:`uneven_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from datamodules.tfrecord import TFRecordDataset
from datamodules.tfrecord.features import Spec

Files = str | Sequence[str]


def uneven_for(split: str) -> str:
    """How a TFRecord split is divided over DDP ranks: training pads ranks to equal length (every rank must run
    the same number of steps), evaluation splits exactly so no record is counted twice by the metrics."""
    return "pad" if split == "train" else "none"


@dataclass(frozen=True)
class TFRecordShards:
    """The shards of each split and the training shuffle (the arguments of the module docstring).

    Attributes:
        files: split (``"train"``, ``"val"``, ``"test"``) -> shard paths or glob patterns; None: none given.
        shuffle_buffer, seed: the training shuffle.
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records.
    """

    files: Mapping[str, Files | None]
    shuffle_buffer: int = 256
    seed: int = 0
    on_corrupt: str = "raise"

    @classmethod
    def of_splits(cls, *, train_files: Files, val_files: Files | None = None, test_files: Files | None = None,
                  shuffle_buffer: int = 256, seed: int = 0, on_corrupt: str = "raise") -> TFRecordShards:
        """Train / val / test shards, ``test_files`` defaulting to ``val_files``."""
        return cls({"train": train_files, "val": val_files, "test": test_files or val_files},
                   shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)

    def dataset(self, split: str, *, features: Mapping[str, Spec], decode: Callable[[dict[str, Any]], Any],
                batch_size: int) -> TFRecordDataset:
        """The records of ``split``'s shards parsed by ``features`` and decoded by ``decode``.

        ``"train"`` is shuffled and padded to equal batch counts per rank; any other split is read in order,
        every record exactly once.
        """
        return TFRecordDataset(
            self.files[split], features=features, decode=decode, shuffle=split == "train",
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, uneven=uneven_for(split), batch_size=batch_size,
            on_corrupt=self.on_corrupt,
        )
