"""The face family's sample contract: images, verification pairs and predict images as the face task takes them.

Batches are the ones the face task documents: train ``(images (B,3,S,S) float [0,1], labels (B,) int64)``
(:func:`identity_sample` after :func:`face_transform`); validation / test dicts ``image_a``, ``image_b``,
``same``, ``index``, ``identity_a``, ``identity_b`` (:class:`PairImages`, or a ``.bin`` set); predict dicts
``image``, ``name`` (:class:`ImageFiles`, :class:`BinImages`). Every face DataModule (identity folders,
RecordIO, TFRecord) builds its samples here, so the same JPEG gives the same tensor from any of them.

Training augmentation is one preset, the DataModules' ``augment`` argument (:func:`face_transform`): ``"flip"``,
arcface_torch's flips for millions of aligned faces, or ``"small_set"`` (:func:`small_set_augmentations`: random
resized crop, flip, colour jitter, greyscale, random erasing) for a folder of one's own photos; ``"none"`` for
neither. Validation, verification and predict never augment: they take ``face_transform(S, "none")``.

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
import random
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

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


FaceAugment = Literal["none", "flip", "small_set"]
FACE_AUGMENTS: tuple[str, ...] = ("none", "flip", "small_set")

# The small-set preset's parameters (each op's source in :func:`small_set_augmentations`).
CROP_SCALE: tuple[float, float] = (0.8, 1.0)  # share of the image's area a training crop keeps
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect (width / height) range
JITTER, JITTER_P = 0.5, 0.2  # brightness / contrast / saturation factors in [1 - 0.5, 1 + 0.5], on 20% of the faces
GRAY_P = 0.2
ERASE_SCALE: tuple[float, float] = (0.02, 0.33)  # share of the area one erased rectangle covers
ERASE_RATIO: tuple[float, float] = (0.3, 1 / 0.3)  # its aspect (width / height) range
ERASE_P, ERASE_FILL = 0.5, 128  # mid-grey: 0 once the network normalises (x - 0.5) / 0.5


def face_augment(augment: bool | str) -> FaceAugment:
    """The preset name of an ``augment`` argument: ``True`` is ``"flip"``, ``False`` is ``"none"``.

    Raises:
        ValueError: an unknown preset, naming the known ones.
    """
    preset = ("flip" if augment else "none") if isinstance(augment, bool) else augment
    if preset not in FACE_AUGMENTS:
        raise ValueError(f"augment must be true, false or one of {list(FACE_AUGMENTS)}, got {augment!r}")
    return preset  # type: ignore[return-value]


def small_set_augmentations(image_size: int) -> list[A.BasicTransform]:
    """The ``"small_set"`` preset: what the face-recognition literature adds to flips when photos are few or loose.

    In this order, on the decoded ``(H, W, 3)`` uint8 face (the crop replaces the plain resize to ``image_size``):

    1. ``RandomResizedCrop(scale=(0.8, 1), ratio=(3/4, 4/3))`` to ``image_size``, every face: the op and aspect range
       of AdaFace's crop augmentation (Kim et al., CVPR 2022; mk-minchul/AdaFace ``dataset/augmenter.py``:
       torchvision's ``RandomResizedCrop``, scale 0.2-1, on 20% of the faces), with the mild scale of VGGFace2's
       training crops (Cao et al., FG 2018, §4.1: the face box resized to a shorter side of 256, then a random
       224x224 region, about 77% of its area, on every face). A face keeps at least 80% of its area, so an aligned
       face stays recognisable and a loosely cropped one is seen at several framings. Scale and aspect together
       bound each side of the crop: on a square face at scale >= 0.8 the aspect stays within 0.8-1.25.
    2. ``HorizontalFlip(p=0.5)``: arcface_torch's one augmentation (``dataset.py``, REFERENCE.md §1.1).
    3. ``ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0, p=0.2)``: AdaFace's photometric
       augmentation (``transforms.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0)``,
       ``photometric_augmentation_prob`` 0.2 in its training scripts). Hue is left alone: skin tone is identity.
    4. ``ToGray(p=0.2)``: VGGFace2's monochrome augmentation (§4.1: with probability 20%, against over-fitting to
       colour images); a folder of one's own photos often mixes greyscale ones in.
    5. ``Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill=128, p=0.5)``: Random Erasing (Zhong et al., AAAI 2020:
       p 0.5, area 0.02-0.4, aspect 0.3-1/0.3; torchvision's ``RandomErasing`` defaults cap the area at 0.33), one
       rectangle of mid-grey, as insightface's own MXNet ArcFace iterator blanks a square to 128 (``cutoff``,
       ``recognition/ArcFace/image_iter.py``, on half of the faces): occlusions (hands, glasses, masks) are what a
       few photos per person rarely show.
    """
    return [
        A.RandomResizedCrop(size=(image_size, image_size), scale=CROP_SCALE, ratio=CROP_RATIO, p=1.0),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, hue=0.0, p=JITTER_P),
        A.ToGray(num_output_channels=3, p=GRAY_P),
        A.Erasing(scale=ERASE_SCALE, ratio=ERASE_RATIO, fill=ERASE_FILL, p=ERASE_P),
    ]


def face_transform(image_size: int, augment: bool | FaceAugment = "none") -> A.Compose | TorchSeeded:
    """``(H, W, 3)`` uint8 face -> ``(3, S, S)`` float tensor in [0, 1], with the training preset ``augment``.

    * ``"none"`` (or ``False``): resize to ``image_size`` square (aligned faces are already 112x112): validation,
      verification and predict always use this;
    * ``"flip"`` (or ``True``): the resize, then a horizontal flip with probability 0.5, arcface_torch's recipe for
      millions of aligned faces (MS1M, Glint360K, WebFace; ``dataset.py``, REFERENCE.md §1.1);
    * ``"small_set"``: :func:`small_set_augmentations` (random resized crop, flip, colour jitter, greyscale, random
      erasing), for a folder of thousands of photos or faces that are not tightly aligned.

    A random preset draws each sample's augmentation from torch's generator (:class:`TorchSeeded`): seeded by
    ``seed_everything``, distinct in each DataLoader worker, restored when a fit resumes exactly.
    """
    preset = face_augment(augment)
    if preset == "small_set":
        steps = small_set_augmentations(image_size)
    else:
        steps = [A.Resize(image_size, image_size)]
        if preset == "flip":
            steps.append(A.HorizontalFlip(p=0.5))  # insightface trains with flips only
    transform = A.Compose(steps + to_tensor())
    return transform if preset == "none" else TorchSeeded(transform)


class TorchSeeded:
    """An albumentations pipeline whose random draws come from torch's generator: one seed drawn per call.

    albumentations draws from generators of its own, which ``seed_everything`` does not reach, which every DataLoader
    worker inherits in the same state (all workers would repeat one sequence of crops and flips) and which a resumed
    fit does not restore. Seeding them from ``torch.randint`` at every call makes each sample's augmentation a draw
    of torch's generator in the process that loads it, as a torchvision transform's would be: seeded by
    ``seed_everything``, distinct per worker (torch seeds each), restored by an exact resume. One generator pair is
    shared by all the ops (``set_random_state``): albumentations' ``set_random_seed`` / ``Compose(seed=...)`` seeds
    each op with the same number, so ops of equal probability would fire together. Called like the pipeline
    (``transform(image=...)``); picklable.
    """

    def __init__(self, transform: A.Compose) -> None:
        self.transform = transform

    def __call__(self, **data: Any) -> dict[str, Any]:
        seed = int(torch.randint(0, 2**62, ()))
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.transform(**data)

    def __repr__(self) -> str:
        return f"TorchSeeded({self.transform!r})"


def identity_sample(image: np.ndarray, label: int, transform: Callable[..., dict]) -> tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(self, files: list[list[Path]], transform: Callable[..., dict], load: FaceLoader | None = None) -> None:
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

