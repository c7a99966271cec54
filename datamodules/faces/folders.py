"""Face images on disk: one folder per identity for training, pairs for verification; what every face DataModule shares.

Layout: ``root/<identity>/<image>`` with images of ``datamodules.images.IMAGE_EXTENSIONS`` (jpg, png,
pgm, ...; greyscale and palette images become RGB, EXIF-rotated photos are read upright). Identities are
the sorted folder names that hold at least one readable image; a folder without one is skipped with a
warning naming it. Raw photos are aligned on the fly from a landmarks CSV (``landmarks``: 5 points per
image, insightface's ``norm_crop``).

Verification pairs come from ``pairs`` (an LFW ``pairs.txt`` or a ``path_a,path_b,same`` CSV, see
:func:`datamodules.faces.samples.parse_pairs`; paths in it are relative to ``pairs_root``, default the pairs
file's folder), or from insightface's ``.bin`` verification sets (``val_bins``, one validation dataloader each;
the shared :class:`FaceDataModule` gives them to every face DataModule). Without either, a ``val_fraction`` of the
identities is held out (never trained on) and ``num_val_pairs`` balanced pairs are drawn from them. Samples and
batches: :mod:`datamodules.faces.samples`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.base import BaseDataModule
from datamodules.faces.align import arcface_template
from datamodules.faces.samples import (
    ArrayTransform,
    BinImages,
    FaceAugment,
    FaceLoader,
    IdentityImages,
    ImageFiles,
    PairImages,
    face_augment,
    face_transform,
    parse_pairs,
    read_landmarks,
    sample_pairs,
)
from datamodules.face_bin import VerificationBinDataset
from datamodules.images import decode_image, image_header, is_image_file, list_images


def _readable(path: Path) -> bool:
    try:
        image_header(path)  # the header only (a TIFF is decoded)
        return True
    except OSError:
        return False


def scan_identity_folders(root: str | Path) -> tuple[list[str], list[list[Path]]]:
    """Identity names (sorted folder names) and their image files; folders with no readable image skipped.

    A folder counts when one of its image files opens (header check; the other files are checked
    when they are loaded, so scanning a million-image tree stays fast).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identity root {root} is not a directory")
    names, files = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = list_images(folder)
        if not any(_readable(p) for p in images):
            warnings.warn(f"identity folder {folder} has no readable image: skipped", stacklevel=2)
            continue
        names.append(folder.name)
        files.append(images)
    return names, files


class FaceDataModule(BaseDataModule):
    """What the face DataModules share: verification sets for validation and test, images for predict.

    A subclass gives the number of training identities (``num_identities``) and builds the training set
    (``train_dataset``). Validation and test use the same verification sets, either

    * insightface's ``.bin`` files (``val_bins``: LFW, CFP-FP, AgeDB-30, ...; one dataloader per file, named by
      the file stem in ``verification_sets``, which the CLI links into the task); relative paths are relative to
      ``bins_base()`` (the working directory here; the RecordIO DataModule uses the ``.rec``'s folder); images
      whose size is not ``image_size`` are resized to it, as insightface's ``load_bin`` does; or
    * one unnamed set of pairs of image files from ``pairs`` (relative to ``pairs_root``, default the pairs
      file's folder) unless the subclass lists them otherwise (``list_pairs``, ``pairs_base``).

    ``predict`` embeds every image under ``predict_root`` (recursively), else every image of the ``.bin`` sets
    (named ``<set>/<number>``), else the pairs' images (named relative to ``pairs_base()``). ``image_loader``
    (a :class:`FaceLoader`) reads the image files, so a subclass can align them.

    Training samples go through ``train_transform()``, the ``augment`` preset (``"flip"``, ``"small_set"`` or
    ``"none"``; ``True`` / ``False`` are ``"flip"`` / ``"none"``, see :func:`datamodules.faces.samples.face_transform`);
    validation, test and predict through ``face_transform(image_size, "none")`` whatever ``augment`` is.
    """

    predict_split = "predict"

    def __init__(self, *, image_size: int, augment: bool | FaceAugment, pairs: str | None, pairs_root: str | None,
                 val_bins: list[str] | None, predict_root: str | None, batch_size: int, num_workers: int,
                 pin_memory: bool) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if pairs is not None and val_bins:
            raise ValueError(f"give verification pairs ({pairs}) or .bin sets ({val_bins}), not both")
        try:
            face_augment(augment)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self.image_size, self.predict_root, self.augment = image_size, predict_root, augment
        self.pairs, self.pairs_root = pairs, pairs_root
        self.val_bins = list(val_bins) if val_bins else None
        self._pairs: list[tuple[Path, Path, bool]] | None = None
        self._image_loader: FaceLoader | None = None

    @property
    def image_loader(self) -> FaceLoader:
        """What reads the image files (built on first use by :meth:`make_image_loader`)."""
        if self._image_loader is None:
            self._image_loader = self.make_image_loader()
        return self._image_loader

    def make_image_loader(self) -> FaceLoader:
        """Decode only; a subclass that aligns faces returns a :class:`FaceLoader` with landmarks."""
        return FaceLoader()

    @property
    def num_identities(self) -> int:
        """Number of training identities (the classifier size)."""
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        """The training samples ``(image (3,S,S), label int64)``, through :meth:`train_transform`."""
        raise NotImplementedError

    def train_transform(self) -> Callable[..., dict]:
        """The training pipeline of the ``augment`` preset (:func:`~datamodules.faces.samples.face_transform`)."""
        return face_transform(self.image_size, self.augment)

    # -- .bin verification sets ----------------------------------------------------------------------
    def bins_base(self) -> Path:
        """Folder relative ``val_bins`` paths are relative to."""
        return Path.cwd()

    def bin_paths(self) -> list[Path]:
        """The ``val_bins`` files, resolved; a missing one is an error naming it."""
        paths = []
        for given in self.val_bins or []:
            path = Path(given) if Path(given).is_absolute() else self.bins_base() / given
            if not path.is_file():
                raise FileNotFoundError(f"verification set {given!r}: {path} does not exist (relative paths are "
                                        f"relative to {self.bins_base()})")
            paths.append(path)
        return paths

    @property
    def verification_sets(self) -> list[str] | None:
        """Names of the validation / test sets in dataloader order (the ``.bin`` stems); None for one unnamed set."""
        if not self.val_bins:
            return None
        names = [path.stem for path in self.bin_paths()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"val_bins {self.val_bins}: the set names (file stems) {repeated} repeat; metric keys "
                             "such as val/<name>/accuracy need distinct names")
        return names

    def bin_set(self, name: str) -> Dataset:
        """The pairs of the ``.bin`` set ``name`` as validation batches, loaded on first use."""
        return self.dataset(f"val/{name}")

    # -- image-file pairs ------------------------------------------------------------------------------
    def list_pairs(self) -> list[tuple[Path, Path, bool]]:
        """The verification pairs ``(path_a, path_b, same)`` of the pairs file (read once, by ``verification_pairs``)."""
        if self.pairs is None:
            raise ValueError(f"{type(self).__name__}: no verification data; give `pairs` (a pairs file) or `val_bins`")
        return parse_pairs(self.pairs, self.pairs_root)

    def pairs_base(self) -> Path:
        """Folder the predicted pair images are named relative to."""
        return Path(self.pairs_root or Path(self.pairs).parent)

    def verification_pairs(self) -> list[tuple[Path, Path, bool]]:
        """The pairs of the validation / test split, listed on first use."""
        if self._pairs is None:
            self._pairs = self.list_pairs()
        return self._pairs

    # -- datasets and loaders --------------------------------------------------------------------------
    def build_dataset(self, split: str) -> Dataset:
        if split == "train":
            return self.train_dataset()
        if split == "test":
            return self.dataset("val")  # the same verification sets serve both
        transform = face_transform(self.image_size, "none")  # evaluation never augments
        names = self.verification_sets
        if split == "val":
            if names:
                return self.bin_set(names[0])
            return PairImages(self.verification_pairs(), transform, self.image_loader)
        if names and split.startswith("val/") and split[4:] in names:
            path = self.bin_paths()[names.index(split[4:])]
            return VerificationBinDataset(path, ArrayTransform(transform), decode=decode_image)
        if split != "predict":
            raise ValueError(f"unknown split {split!r}: expected train, val, test, predict or val/<set>")
        if self.predict_root is not None:
            base = Path(self.predict_root)
            paths = sorted(p for p in base.rglob("*") if is_image_file(p))
        elif names:
            return BinImages([self.bin_set(name) for name in names], transform)
        else:
            base = self.pairs_base()
            paths = sorted({p for a, b, _ in self.verification_pairs() for p in (a, b)})
        return ImageFiles(paths, transform, base, self.image_loader)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader of the pairs, or one per ``.bin`` set in ``verification_sets`` order."""
        names = self.verification_sets
        if not names:
            return super().val_dataloader()
        return [self.make_loader(self.bin_set(name), train=False, collate_fn=self.collate_fn) for name in names]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader() if self.verification_sets else super().test_dataloader()


class NamedIdentities:
    """Identities with names known up front (folders, label maps): ``num_identities`` and ``class_names``."""

    def identities(self) -> list[str]:
        """Training identity names, index = label."""
        raise NotImplementedError

    @property
    def num_identities(self) -> int:
        """Number of training identities (the classifier size)."""
        return len(self.identities())

    @property
    def class_names(self) -> list[str]:
        """Training identity names, index = label."""
        return list(self.identities())


class IdentityFolderDataModule(NamedIdentities, FaceDataModule):
    """Face recognition data from ``root/<identity>/*`` folders, verified on LFW-style / CSV pairs or ``.bin`` sets.

    Args:
        root: folder of identity folders (the training set).
        pairs: LFW ``pairs.txt`` or ``path_a,path_b,same`` CSV for validation / test; None (and no
            ``val_bins``) holds out ``val_fraction`` of the identities instead.
        pairs_root: folder the pair paths are relative to (default: the pairs file's folder).
        val_bins: insightface ``.bin`` verification sets instead of pairs (relative to the working directory or
            absolute), one validation dataloader each; no identity is held out then.
        val_fraction: share of identities held out when neither ``pairs`` nor ``val_bins`` is given.
        num_val_pairs: pairs drawn from the held-out identities.
        predict_root: folder whose images (recursively) ``predict`` embeds; default the validation images.
        landmarks: CSV of ``image path, 10 numbers`` (5 landmarks: eyes, nose tip, mouth corners, as a detector
            gives them; paths relative to the CSV's folder or absolute): every image file read for training,
            validation or predict is first aligned onto arcface_torch's template (insightface ``norm_crop``,
            :mod:`datamodules.faces.align`) at ``image_size``; an image without a row is an error.
        landmarks_layout: ``"interleaved"`` (``x1, y1, ..., x5, y5``) or ``"planar"`` (``x1..x5, y1..y5``).
        image_size: side S the images are resized (or aligned) to.
        augment: training augmentation: ``"flip"`` (arcface_torch's, for large aligned sets), ``"small_set"``
            (random resized crop, flip, colour jitter, greyscale, random erasing: for thousands of photos or loosely
            aligned faces; :func:`datamodules.faces.samples.small_set_augmentations`) or ``"none"``.
        seed: the identity hold-out and pair draw.
    """

    def __init__(
        self,
        root: str,
        pairs: str | None = None,
        pairs_root: str | None = None,
        val_bins: list[str] | None = None,
        val_fraction: float = 0.1,
        num_val_pairs: int = 1000,
        predict_root: str | None = None,
        landmarks: str | None = None,
        landmarks_layout: str = "interleaved",
        image_size: int = 112,
        augment: bool | FaceAugment = "flip",
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, augment=augment, pairs=pairs, pairs_root=pairs_root, val_bins=val_bins,
                         predict_root=predict_root, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory)
        self.save_hyperparameters()
        self.root, self.val_fraction, self.num_val_pairs, self.seed = root, val_fraction, num_val_pairs, seed
        self.landmarks, self.landmarks_layout = landmarks, landmarks_layout
        if landmarks is not None:
            arcface_template(image_size)  # a size without an alignment template fails now, naming it
        self._scan: tuple[list[str], list[list[Path]], list[list[Path]]] | None = None

    def _split(self) -> tuple[list[str], list[list[Path]], list[list[Path]]]:
        """Training identity names and files, and held-out identities' files (empty with a pairs file)."""
        if self._scan is None:
            names, files = scan_identity_folders(self.root)
            held_out: list[list[Path]] = []
            if self.pairs is None and not self.val_bins:
                order = np.random.default_rng(self.seed).permutation(len(names))
                n_val = int(round(self.val_fraction * len(names)))
                val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])
                held_out = [files[i] for i in val_ids]
                names, files = [names[i] for i in train_ids], [files[i] for i in train_ids]
            if len(names) < 2:
                raise ValueError(
                    f"{self.root}: {len(names)} training identit{'y' if len(names) == 1 else 'ies'} with readable "
                    "images; face recognition needs at least 2 (one folder per identity)"
                )
            self._scan = (names, files, held_out)
        return self._scan

    def identities(self) -> list[str]:
        return self._split()[0]

    def make_image_loader(self) -> FaceLoader:
        if self.landmarks is None:
            return FaceLoader()
        return FaceLoader(read_landmarks(self.landmarks, self.landmarks_layout), self.image_size, self.landmarks)

    def train_dataset(self) -> IdentityImages:
        return IdentityImages(self._split()[1], self.train_transform(), self.image_loader)

    def list_pairs(self) -> list[tuple[Path, Path, bool]]:
        if self.pairs is not None:
            return super().list_pairs()
        held_out = self._split()[2]
        if not held_out:
            raise ValueError(f"{self.root}: no verification pairs; give `pairs` or a `val_fraction` > 0")
        return sample_pairs(held_out, self.num_val_pairs, self.seed)

    def pairs_base(self) -> Path:
        return super().pairs_base() if self.pairs else Path(self.root)
