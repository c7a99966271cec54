"""Face recognition from insightface's RecordIO packs (MS1M, Glint360K, WebFace) and ``.bin`` sets, without MXNet.

insightface distributes its training sets as ``train.rec`` + ``train.idx`` (MXNet RecordIO) with the verification
sets beside them as pickled ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...). The format is read
by our own code: :mod:`datamodules.recordio` (random access through the ``.idx`` offsets, one file descriptor per
process, opened lazily after a DataLoader worker forks; never the whole file in memory) and
:mod:`datamodules.face_bin` (a restricted unpickler). Images are decoded by :func:`datamodules.images.decode_image`
and go through the face family's sample function (:func:`datamodules.faces.samples.identity_sample`), so a record gives
the same tensor as the same JPEG in an identity folder or a TFRecord shard.

Training augmentation is arcface_torch's by default (REFERENCE.md §1.1): a random horizontal flip only (``augment``
``"flip"``; ``"small_set"`` for a small pack, see :func:`datamodules.faces.samples.face_transform`); images whose size
is not ``image_size`` (112 for every insightface pack) are resized to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from datamodules.faces.folders import FaceDataModule
from datamodules.faces.samples import FaceAugment, identity_sample
from datamodules.images import decode_image
from datamodules.recordio import RecordIODataset, class_of


def identity_count(records: RecordIODataset) -> int:
    """Training identities of a pack: the header record's, else the ``property`` file's, else largest label + 1."""
    if records.num_identities is not None:
        return records.num_identities
    labels = records.labels()
    return int(labels.max()) + 1 if len(labels) else 0


class RecordIOIdentities(Dataset):
    """``(image (3,S,S) float [0,1], label int64)`` for item ``i`` of a :class:`~datamodules.recordio.RecordIODataset`.

    A label outside ``[0, num_identities)`` is an error naming the file, key and byte offset of the record.
    """

    def __init__(self, records: RecordIODataset, num_identities: int, transform) -> None:
        self.records, self.num_identities, self.transform = records, num_identities, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        header, data, where = self.records.read(index)
        label = class_of(header.label, where)
        if label >= self.num_identities:
            raise ValueError(f"{where}: label {label} is not below num_identities={self.num_identities} (from the "
                             "header record, the property file or the labels)")
        return identity_sample(decode_image(data, where), label, self.transform)


class RecordIOFaceDataModule(FaceDataModule):
    """Train on an insightface ``train.rec`` / ``train.idx`` pack; verify on its ``.bin`` sets (or pairs of files).

    ``lit-tasks fit --config configs/face/arcface_ms1m.yaml --data.rec /data/ms1m/train.rec
    --data.val_bins '[lfw.bin, cfp_fp.bin, agedb_30.bin]'``: each ``.bin`` is one validation dataloader, named by
    its stem (``val/lfw/accuracy``, ...).

    Both layouts insightface reads (``MXFaceDataset``): with a header record 0 (MS1M, Glint360K: images are keys
    ``1 .. header[0] - 1``) and without (every key is an image; a key 0 that holds an image is one, whatever its
    label, see :class:`~datamodules.recordio.RecordIODataset`). ``num_identities`` comes from the header record
    (``header[1] - header[0]`` identity records), else from the ``property`` file beside the ``.rec``
    (``num_classes,height,width``), else from the labels (largest + 1, reading the first bytes of every record).

    Args:
        rec: the ``train.rec`` file.
        idx: its index; default beside it with suffix ``.idx``.
        val_bins: ``.bin`` verification sets, relative to the ``.rec``'s folder (where insightface's packs keep
            them) or absolute.
        pairs, pairs_root: instead of ``val_bins``, an LFW ``pairs.txt`` or ``path_a,path_b,same`` CSV of image
            files (relative to ``pairs_root``, default the pairs file's folder).
        predict_root: folder whose images (recursively) ``predict`` embeds; default the ``.bin`` sets' images.
        image_size: side S of the network input (112); other sizes are resized to it.
        augment: training augmentation: ``"flip"`` (= true; arcface_torch's only augmentation), ``"small_set"``
            (:func:`datamodules.faces.samples.small_set_augmentations`) or ``"none"`` (= false).
        batch_size, num_workers, pin_memory: as ``BaseDataModule`` (arcface_torch: 128 per GPU, 2 workers).
    """

    def __init__(
        self,
        rec: str,
        idx: str | None = None,
        val_bins: list[str] | None = None,
        pairs: str | None = None,
        pairs_root: str | None = None,
        predict_root: str | None = None,
        image_size: int = 112,
        augment: bool | FaceAugment = "flip",
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, augment=augment, pairs=pairs, pairs_root=pairs_root, val_bins=val_bins,
                         predict_root=predict_root, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.save_hyperparameters()
        self.rec, self.idx = rec, idx
        self._records: RecordIODataset | None = None
        self._num_identities: int | None = None

    def records(self) -> RecordIODataset:
        """The pack's images (the ``.idx`` is read once; records are read on demand)."""
        if self._records is None:
            self._records = RecordIODataset(self.rec, self.idx, decode=decode_image)
        return self._records

    def bins_base(self) -> Path:
        return Path(self.rec).parent

    @property
    def num_identities(self) -> int:
        """Training identities: header record, else ``property`` file, else largest label + 1."""
        if self._num_identities is None:
            count = identity_count(self.records())
            if count < 2:
                raise ValueError(f"{self.rec}: {count} identit{'y' if count == 1 else 'ies'}; face recognition needs "
                                 "at least 2")
            self._num_identities = count
        return self._num_identities

    def train_dataset(self) -> RecordIOIdentities:
        return RecordIOIdentities(self.records(), self.num_identities, self.train_transform())
