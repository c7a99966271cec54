"""Face identities as TFRecord shards: the identity-folder encoder, the decoder, the DataModule.

Besides the ``image/*`` keys (:mod:`datamodules.tfrecord_images`) a record holds ``image/class/label`` (a
label-map id) and ``image/class/text`` (the identity's name). ``tools/make_tfrecords.py folder`` writes
one record per image of ``ROOT/<identity>/<image>`` with ``folder_examples``, in a seeded random order
(as TF and RecordIO converters do, so a shuffle buffer small against the dataset still mixes
identities), and the label map ``OUT.label_map.pbtxt``; ``make_tfrecords.py rec`` does the same for an
insightface RecordIO pack with ``recordio_examples`` (the JPEG bytes as stored, class ``k`` named ``"k"``).
Sorted by id, the label map's ids become the contiguous labels ``0 .. N - 1`` and its names the
``class_names``, known without reading a record; for shards made by ``make_tfrecords.py folder`` that is
the folder DataModule's mapping (both scan the identity folders with ``scan_identity_folders``).

Records are decoded by the folder DataModule's own code (``decode_image`` + ``identity_sample``), so an
image gives the same tensor from a shard as from its file. Verification pairs for validation and test
stay a pairs file over an image folder, exactly as for :class:`~datamodules.faces.folders.IdentityFolderDataModule`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from datamodules.faces.folders import FaceDataModule, NamedIdentities, scan_identity_folders
from datamodules.faces.samples import FaceAugment, identity_sample
from datamodules.tfrecord import (
    FixedLen,
    TFRecordDataset,
    build_example,
    bytes_feature,
    int64_feature,
    normalize_spec,
    read_label_map,
)
from datamodules.tfrecord.example_pb2 import Example
from datamodules.recordio import RecordIODataset, class_of
from datamodules.tfrecord_images import IMAGE_FEATURES, decode_image_feature, encoded_image_features, image_features
from datamodules.tfrecord_shards import TFRecordShards

LABEL_KEY, TEXT_KEY = "image/class/label", "image/class/text"
IDENTITY_FEATURES = normalize_spec({
    **IMAGE_FEATURES,
    LABEL_KEY: FixedLen((), "int64"),
    TEXT_KEY: FixedLen((), "bytes", default=b""),
})


def folder_classes(root: str) -> tuple[list[str], list[list[str]]]:
    """Class (identity) names and their image files, exactly as ``IdentityFolderDataModule`` scans ``root``.

    The same scan (sorted sub-folders, image files directly inside, folders without a readable image
    skipped with a warning) gives the same names and so the same labels from shards as from the folder.
    """
    names, files = scan_identity_folders(root)
    if not names:
        raise ValueError(f"{root}: no sub-folders with images (expected ROOT/<class>/<image>)")
    return names, [[str(p) for p in group] for group in files]


def folder_examples(root: str, classes: Sequence[str], files: Sequence[Sequence[str]], seed: int = 0
                    ) -> Iterator[Example]:
    """One Example per image of ``root/<class>/...`` in a random order drawn from ``seed``.

    ``image/class/label`` is the class index. Shuffled here, once: written in folder order, a shard
    would hold one identity after another and a shuffle buffer smaller than the dataset could not mix
    them (TensorFlow's and MXNet RecordIO's converters shuffle for the same reason).
    """
    items = [(label, path) for label, paths in enumerate(files) for path in paths]
    for k in np.random.default_rng(seed).permutation(len(items)):
        label, path = items[k]
        relative = os.path.relpath(path, root)
        features, _, _ = image_features(path, relative, relative)
        yield build_example({**features, LABEL_KEY: int64_feature(label), TEXT_KEY: bytes_feature(classes[label])})


def recordio_examples(records: RecordIODataset, seed: int = 0) -> Iterator[Example]:
    """One Example per image of an insightface RecordIO pack, in a random order drawn from ``seed``.

    The JPEG bytes are stored as they are (never re-encoded); ``image/class/label`` is the record's class,
    ``image/class/text`` its decimal name (``make_tfrecords.py rec`` names class ``k`` ``"k"`` in the label map),
    ``image/filename`` / ``image/source_id`` ``<rec file>:<key>``. Shuffled for the reason
    :func:`folder_examples` is: the packs are written identity after identity.

    Raises:
        RecordIOError / ValueError / OSError: a damaged record, label or image, naming the file, key and offset.
    """
    name = os.path.basename(records.records.rec_path)
    for k in np.random.default_rng(seed).permutation(len(records)):
        header, data, where = records.read(int(k))
        label = class_of(header.label, where)
        source = f"{name}:{int(records.image_keys[k])}"
        features, _, _ = encoded_image_features(bytes(data), source, source, where)
        yield build_example({**features, LABEL_KEY: int64_feature(label), TEXT_KEY: bytes_feature(str(label))})


class IdentityDecoder:
    """Parsed example -> ``(image (3,S,S) float [0,1], label int64)`` as ``IdentityImages`` gives (picklable).

    ``image/class/label`` (a label-map id) becomes its position among the sorted ids; when the record
    also names its identity (``image/class/text``), the name must be the label map's, so shards and a
    label map from different conversions fail loudly instead of training on wrong labels.
    """

    def __init__(self, ids: Sequence[int], names: Sequence[str], transform: Callable[..., dict],
                 label_map: str = "") -> None:
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
        return identity_sample(decode_image_feature(example), label, self.transform)


class TFRecordIdentityDataModule(NamedIdentities, FaceDataModule):
    """Face recognition from identity shards (``data/faces-*.tfrecord``), verified on pairs files or ``.bin`` sets.

    Args:
        train_files: training shards, paths or glob patterns (plain, ``.gz`` or ``.zlib``).
        label_map: ``label_map.pbtxt`` of the ids in ``image/class/label`` (``make_tfrecords.py folder``
            writes ``OUT.label_map.pbtxt``).
        pairs: LFW ``pairs.txt`` or ``path_a,path_b,same`` CSV for validation / test.
        pairs_root: folder the pair paths are relative to (default: the pairs file's folder).
        val_bins: insightface ``.bin`` verification sets instead of ``pairs`` (relative to the working directory
            or absolute), one validation dataloader each.
        predict_root: folder whose images (recursively) ``predict`` embeds; default the pairs' images.
        image_size: side S the images are resized to.
        augment: training augmentation: ``"flip"`` (= true; arcface_torch's), ``"small_set"``
            (:func:`datamodules.faces.samples.small_set_augmentations`) or ``"none"`` (= false).
        shuffle_buffer, seed: training shuffle (shard order per epoch + a buffer of this many records).
            ``make_tfrecords.py folder`` shuffles the records when it writes them, so the buffer only
            has to vary the order from epoch to epoch.
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (see ``TFRecordDataset``).
        batch_size, num_workers, pin_memory: as ``BaseDataModule``.

    The shard arguments and how training reads them: :mod:`datamodules.tfrecord_shards`.
    """

    def __init__(
        self,
        train_files: str | list[str],
        label_map: str,
        pairs: str | None = None,
        pairs_root: str | None = None,
        val_bins: list[str] | None = None,
        predict_root: str | None = None,
        image_size: int = 112,
        augment: bool | FaceAugment = "flip",
        shuffle_buffer: int = 4096,
        seed: int = 0,
        on_corrupt: str = "raise",
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, augment=augment, pairs=pairs, pairs_root=pairs_root,
                         val_bins=val_bins, predict_root=predict_root, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.save_hyperparameters()
        self.shards = TFRecordShards({"train": train_files}, shuffle_buffer=shuffle_buffer, seed=seed,
                                     on_corrupt=on_corrupt)
        self.label_map = label_map
        self._labels: tuple[list[int], list[str]] | None = None

    def _label_map(self) -> tuple[list[int], list[str]]:
        if self._labels is None:
            ids, names = read_label_map(self.label_map)
            if len(ids) < 2:
                raise ValueError(f"label map {self.label_map} lists {len(ids)} identity; face recognition needs "
                                 "at least 2")
            self._labels = (ids, names)
        return self._labels

    def identities(self) -> list[str]:
        return self._label_map()[1]

    def train_dataset(self) -> TFRecordDataset:
        ids, names = self._label_map()
        decoder = IdentityDecoder(ids, names, self.train_transform(), self.label_map)
        return self.shards.dataset("train", features=IDENTITY_FEATURES, decode=decoder, batch_size=self.batch_size)
