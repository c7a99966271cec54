"""Face identities from TFRecord shards (``image/class/label``, as ``tools/make_tfrecords.py folder`` writes).

Training images come from the shards; verification pairs for validation and test stay a pairs file
over an image folder, exactly as for :class:`~datamodules.faces.IdentityFolderDataModule`. Records are
decoded by the folder DataModule's own code (``load_rgb`` + ``face_transform``), so an image gives
the same tensor from a shard as from its file. The identities come from the label map written beside
the shards (``OUT.label_map.pbtxt``): sorted by id, the ids become the contiguous labels ``0 .. N - 1``
and their names the ``class_names``, known without reading a record. For shards made by
``make_tfrecords.py folder`` that is the folder DataModule's mapping (both sort the identity folders).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks the network

import albumentations as A
import torch

from ..faces import FaceDataModule, face_transform, identity_sample, load_rgb, parse_pairs
from .convert import read_label_map
from .dataset import TFRecordDataset
from .features import FixedLen, normalize_spec

LABEL_KEY, TEXT_KEY = "image/class/label", "image/class/text"
IDENTITY_FEATURES = normalize_spec({
    "image/encoded": FixedLen((), "bytes"),
    LABEL_KEY: FixedLen((), "int64"),
    TEXT_KEY: FixedLen((), "bytes", default=b""),
})


class IdentityDecoder:
    """Parsed example -> ``(image (3,S,S) float [0,1], label int64)`` as ``IdentityImages`` gives (picklable).

    ``image/class/label`` (a label-map id) becomes its position among the sorted ids; when the record
    also names its identity (``image/class/text``), the name must be the label map's, so shards and a
    label map from different conversions fail loudly instead of training on wrong labels.
    """

    def __init__(self, ids: Sequence[int], names: Sequence[str], transform: A.Compose, label_map: str = "") -> None:
        self.label_of = {int(i): label for label, i in enumerate(ids)}
        self.names, self.transform, self.label_map = list(names), transform, label_map

    def __call__(self, example: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        stored = int(example[LABEL_KEY])
        label = self.label_of.get(stored)
        if label is None:
            raise ValueError(f"{LABEL_KEY} {stored} is not in the label map {self.label_map} "
                             f"({len(self.label_of)} ids from {min(self.label_of)} to {max(self.label_of)})")
        text = example[TEXT_KEY].decode("utf-8", errors="replace")
        if text and text != self.names[label]:
            raise ValueError(f"{TEXT_KEY} {text!r} differs from the name {self.names[label]!r} that the label map "
                             f"{self.label_map} gives id {stored}: the shards and the label map do not belong together")
        return identity_sample(load_rgb(io.BytesIO(example["image/encoded"]), "image/encoded"), label, self.transform)


class TFRecordIdentityDataModule(FaceDataModule):
    """Face recognition from identity shards (``data/faces-*.tfrecord``) with LFW-style or CSV verification pairs.

    Args:
        train_files: training shards, paths or glob patterns (plain, ``.gz`` or ``.zlib``).
        label_map: ``label_map.pbtxt`` of the ids in ``image/class/label`` (``make_tfrecords.py folder``
            writes ``OUT.label_map.pbtxt``).
        pairs: LFW ``pairs.txt`` or ``path_a,path_b,same`` CSV for validation / test.
        pairs_root: folder the pair paths are relative to (default: the pairs file's folder).
        predict_root: folder whose images (recursively) ``predict`` embeds; default the pairs' images.
        image_size: side S the images are resized to.
        augment: random horizontal flips when training (off: the evaluation transform).
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
            ``make_tfrecords.py folder`` writes each shard identity by identity, so the buffer should span
            many identities for mixed batches.
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.
    """

    def __init__(
        self,
        train_files: str | list[str],
        label_map: str,
        pairs: str,
        pairs_root: str | None = None,
        predict_root: str | None = None,
        image_size: int = 112,
        augment: bool = True,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        on_corrupt: str = "raise",
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size, predict_root, batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        self.train_files, self.label_map = train_files, label_map
        self.pairs, self.pairs_root = pairs, pairs_root
        self.augment, self.shuffle_buffer, self.seed, self.on_corrupt = augment, shuffle_buffer, seed, on_corrupt
        self._labels: tuple[list[int], list[str]] | None = None

    def _label_map(self) -> tuple[list[int], list[str]]:
        if self._labels is None:
            ids, names = read_label_map(self.label_map)
            if len(ids) < 2:
                raise ValueError(f"label map {self.label_map} lists {len(ids)} identity; face recognition needs "
                                 "at least 2")
            self._labels = (ids, names)
        return self._labels

    @property
    def num_identities(self) -> int:
        """Number of training identities (the classifier size), from the label map."""
        return len(self._label_map()[0])

    @property
    def class_names(self) -> list[str]:
        """Training identity names, index = label."""
        return list(self._label_map()[1])

    def train_dataset(self) -> TFRecordDataset:
        ids, names = self._label_map()
        decoder = IdentityDecoder(ids, names, face_transform(self.image_size, train=self.augment), self.label_map)
        return TFRecordDataset(
            self.train_files, features=IDENTITY_FEATURES, decode=decoder, shuffle=True,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, uneven="pad", batch_size=self.batch_size,
            on_corrupt=self.on_corrupt,
        )

    def list_pairs(self) -> list[tuple[Path, Path, bool]]:
        return parse_pairs(self.pairs, self.pairs_root)

    def pairs_base(self) -> Path:
        return Path(self.pairs_root or Path(self.pairs).parent)
