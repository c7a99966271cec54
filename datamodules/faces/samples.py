"""The face family's sample contract: images, verification pairs and predict images as the face task takes them.

Batches are the ones the face task documents: train ``(images (B,3,S,S) float [0,1], labels (B,) int64)``
(:func:`identity_sample` after :func:`face_transform`); validation / test dicts ``image_a``, ``image_b``,
``same``, ``index``, ``identity_a``, ``identity_b`` (:class:`PairImages`, or a ``.bin`` set); predict dicts
``image``, ``name`` (:class:`ImageFiles`, :class:`BinImages`). Every face DataModule (identity folders,
RecordIO, TFRecord) builds its samples here, so the same JPEG gives the same tensor from any of them.

Image files are read by :class:`FaceLoader`: decoded (``datamodules.images.decode_image``; greyscale and palette
images become RGB, EXIF-rotated photos are read upright), then, given a landmarks table (:func:`read_landmarks`:
5 points per image), aligned with insightface's ``norm_crop``.

Verification pairs, from a pairs file (:func:`parse_pairs`; paths in it are relative to ``root``, default the
pairs file's folder):

* LFW ``pairs.txt``: an optional header line of 1-2 integers, then ``name n1 n2`` (same person, images
  ``name/name_000n1.*`` and ``name/name_000n2.*``) or ``name1 n1 name2 n2`` (different people);
* a CSV of ``path_a,path_b,same`` rows (``same`` 1/0/true/false/yes/no; a header row is allowed);

or drawn from held-out identities (:func:`sample_pairs`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.faces.align import arcface_template, norm_crop, read_landmarks_csv
from datamodules.face_bin import VerificationBinDataset
from datamodules.images import decode_image, is_image_file
from datamodules.transforms import to_tensor

TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes"}, {"0", "false", "no"}


def _lfw_image(root: Path, name: str, number: str, where: str) -> Path:
    """``root/name/name_000n.<ext>`` for any image extension; error naming ``where`` if absent."""
    try:
        stem = f"{name}_{int(number):04d}"
    except ValueError:
        raise ValueError(f"{where}: image number {number!r} is not an integer") from None
    folder = root / name
    if folder.is_dir():
        for candidate in sorted(folder.glob(stem + ".*")):
            if is_image_file(candidate):
                return candidate
    raise FileNotFoundError(f"{where}: image {folder / stem}.* not found")


def _is_header(fields: Sequence[str]) -> bool:
    return 1 <= len(fields) <= 2 and all(f.isdigit() for f in fields)


def parse_pairs(path: str | Path, root: str | Path | None = None) -> list[tuple[Path, Path, bool]]:
    """Pairs ``(path_a, path_b, same)`` from an LFW ``pairs.txt`` or a ``path_a,path_b,same`` CSV.

    Args:
        path: the pairs file; ``.csv`` files are read as CSV, anything else as LFW pairs.
        root: folder the pair paths are relative to (default: the pairs file's folder).

    Raises:
        FileNotFoundError / ValueError naming the file and line for a missing image or a malformed line.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found")
    pairs = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                row = [x.strip() for x in row]
                if not row or not any(row):
                    continue
                where = f"{path} line {line_no}"
                if len(row) != 3:
                    raise ValueError(f"{where}: expected 3 fields path_a,path_b,same, got {len(row)}: {row}")
                flag = row[2].lower()
                if flag not in TRUE_WORDS | FALSE_WORDS:
                    if line_no == 1:
                        continue  # header row
                    raise ValueError(f"{where}: 'same' must be 1/0/true/false, got {row[2]!r}")
                a, b = (root / p for p in row[:2])
                for image in (a, b):
                    if not image.is_file():
                        raise FileNotFoundError(f"{where}: image {image} not found")
                pairs.append((a, b, flag in TRUE_WORDS))
        return pairs
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or (line_no == 1 and _is_header(fields)):
                continue
            where = f"{path} line {line_no}"
            if len(fields) == 3:  # name n1 n2: the same person
                name, n1, n2 = fields
                pairs.append((_lfw_image(root, name, n1, where), _lfw_image(root, name, n2, where), True))
            elif len(fields) == 4:  # name1 n1 name2 n2: different people
                name1, n1, name2, n2 = fields
                pairs.append((_lfw_image(root, name1, n1, where), _lfw_image(root, name2, n2, where), False))
            else:
                raise ValueError(f"{where}: expected 3 fields (name n1 n2) or 4 (name1 n1 name2 n2), got {len(fields)}")
    return pairs


def sample_pairs(files: list[list[Path]], num_pairs: int, seed: int = 0) -> list[tuple[Path, Path, bool]]:
    """Alternating same / different pairs from identities' file lists (same pairs need 2+ images)."""
    rng = np.random.default_rng(seed)
    multi = [i for i, f in enumerate(files) if len(f) >= 2]
    if not multi or len(files) < 2:
        raise ValueError("held-out identities cannot make pairs: need one with 2+ images and 2+ identities")
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            i = multi[rng.integers(len(multi))]
            a, b = rng.choice(len(files[i]), 2, replace=False)
            pairs.append((files[i][a], files[i][b], True))
        else:
            i, j = rng.choice(len(files), 2, replace=False)
            pairs.append((files[i][rng.integers(len(files[i]))], files[j][rng.integers(len(files[j]))], False))
    return pairs


def face_transform(image_size: int, train: bool) -> A.Compose:
    """Resize to ``image_size`` square (aligned faces are already 112x112), random flip when training."""
    steps: list = [A.Resize(image_size, image_size)]
    if train:
        steps.append(A.HorizontalFlip(p=0.5))  # insightface trains with flips only
    return A.Compose(steps + to_tensor())


def identity_sample(image: np.ndarray, label: int, transform: A.Compose) -> tuple[torch.Tensor, torch.Tensor]:
    """A training sample ``(image (3,S,S) float [0,1], label int64)`` from an ``(H, W, 3)`` uint8 RGB face."""
    return transform(image=image)["image"], torch.tensor(label, dtype=torch.int64)


class FaceLoader:
    """``path -> (H, W, 3)`` uint8 RGB face: decoded, then aligned by its 5 landmarks if a landmarks table is given.

    Alignment is insightface's ``norm_crop`` (:func:`datamodules.faces.align.norm_crop`: least-squares similarity
    onto arcface_torch's 5-point template, bilinear warp to the ``image_size`` square). A file the table does not
    list is an error naming it and the table: a mix of aligned and unaligned faces would train silently wrong.

    Args:
        landmarks: ``{absolute image path: (5, 2) landmarks}`` (:func:`read_landmarks`), or None (decode only).
        image_size: side of the aligned crop (a multiple of 112 or 128).
        source: the landmarks file, for error messages.
    """

    def __init__(self, landmarks: dict[str, np.ndarray] | None = None, image_size: int = 112, source: str = "") -> None:
        if landmarks is not None:
            arcface_template(image_size)  # refuses a size without a template now, not at the first image
        self.landmarks, self.image_size, self.source = landmarks, image_size, source

    def __call__(self, path: Path) -> np.ndarray:
        image = decode_image(path)
        if self.landmarks is None:
            return image
        points = self.landmarks.get(os.path.abspath(path))
        if points is None:
            raise KeyError(f"{path}: no landmarks for this image in {self.source}; every image to align needs a row")
        return norm_crop(image, points, self.image_size)


def read_landmarks(path: str | os.PathLike, layout: str = "interleaved") -> dict[str, np.ndarray]:
    """``{absolute image path: (5, 2) landmarks}`` of a CSV of ``path, 10 numbers`` rows (:func:`read_landmarks_csv`);
    relative image paths are relative to the CSV's folder."""
    folder = Path(path).parent
    return {os.path.abspath(folder / image): points for image, points in read_landmarks_csv(path, layout).items()}


class IdentityImages(Dataset):
    """``(image (3,S,S) float [0,1], label int64)`` for every file of every identity."""

    def __init__(self, files: list[list[Path]], transform: A.Compose, load: FaceLoader | None = None) -> None:
        self.items = [(p, label) for label, paths in enumerate(files) for p in paths]
        self.transform, self.load = transform, load or FaceLoader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.items[index]
        return identity_sample(self.load(path), label, self.transform)


class PairImages(Dataset):
    """Verification pairs as dicts (``image_a``, ``image_b``, ``same``, ``index``, ``identity_a/b``)."""

    def __init__(self, pairs: list[tuple[Path, Path, bool]], transform: A.Compose,
                 load: FaceLoader | None = None) -> None:
        self.pairs, self.transform, self.load = pairs, transform, load or FaceLoader()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        a, b, same = self.pairs[index]
        return {
            "image_a": self.transform(image=self.load(a))["image"],
            "image_b": self.transform(image=self.load(b))["image"],
            "same": torch.tensor(bool(same)),
            "index": torch.tensor(index, dtype=torch.int64),
            "identity_a": a.parent.name,
            "identity_b": b.parent.name,
        }


class ImageFiles(Dataset):
    """Images of a list of files as ``{"image", "name"}`` (name = path relative to ``base``)."""

    def __init__(self, paths: list[Path], transform: A.Compose, base: Path | None = None,
                 load: FaceLoader | None = None) -> None:
        self.paths, self.transform, self.base, self.load = paths, transform, base, load or FaceLoader()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        name = str(path.relative_to(self.base)) if self.base is not None and path.is_relative_to(self.base) else str(path)
        return {"image": self.transform(image=self.load(path))["image"], "name": name}


class ArrayTransform:
    """An albumentations pipeline as a picklable ``array -> image tensor`` callable (for DataLoader workers)."""

    def __init__(self, transform: A.Compose) -> None:
        self.transform = transform

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image=image)["image"]


class BinImages(Dataset):
    """Every image of some ``.bin`` sets as ``{"image", "name"}`` for ``predict``; names ``<set>/<image number>``."""

    def __init__(self, sets: list[VerificationBinDataset], transform: A.Compose) -> None:
        self.sets, self.transform = sets, transform
        self.items = [(k, n) for k, bin_set in enumerate(sets) for n in range(len(bin_set.images))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        k, n = self.items[index]
        return {"image": self.transform(image=self.sets[k].image(n))["image"], "name": f"{self.sets[k].name}/{n:05d}"}

