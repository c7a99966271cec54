"""Synthetic identities: face-like patterns for training and open-set verification with no download.

An identity is a fixed random *structured* pattern drawn from ``(seed, identity)``: head shape, skin
tone, hairline, eye spacing / size / shape, brows, nose, mouth, a few asymmetric marks and a faint skin
texture. A sample of it is rendered from ``(seed, identity, sample)`` with nuisances a recognition model
must learn to ignore: pose (rotation, scale, shift, a yaw-like squash that slides the features
sideways), expression (mouth curvature, blinking), lighting (gain, a directional gradient, gamma),
colour cast, a random background, occlusion (a band over the eyes or a random box) and sensor noise.
Identities share one layout distribution, so telling them apart needs the fine geometry, not a colour.

Train and validation identities are disjoint (validation ids follow the training ids), which makes the
validation pairs open-set, as LFW is for a model trained on MS1M. Rendering is analytic in numpy on
the pixel grid (pose applied by inverting it per pixel): a 112x112 sample takes about 2 ms.

Training augmentation is one of the face family's presets (``augment``: ``"flip"``, arcface_torch's, or
``"small_set"``, see :func:`datamodules.faces.samples.face_transform`), so the demo shows what a preset does on
identities it never trained on; the validation pairs and predict images are never augmented.

Batches: train ``(image (B,3,S,S) float [0,1], label (B,) int64)``; validation / test pairs a dict with
``image_a``, ``image_b`` ``(B,3,S,S)``, ``same`` ``(B,)`` bool, ``index`` ``(B,)`` int64 pair index,
``identity_a``/``identity_b`` lists of str; predict a dict with ``image`` and ``name`` (list of str).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule
from datamodules.faces.samples import FaceAugment, face_augment, face_transform, identity_sample

STREAM_IDENTITY, STREAM_SAMPLE, STREAM_PAIR = 1, 2, 3  # separate random streams per purpose


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@lru_cache(maxsize=4096)
def identity_params(identity: int, seed: int = 0) -> dict[str, np.ndarray | float]:
    """The fixed appearance of ``identity`` (all lengths in head-radius units, centre-origin)."""
    r = _rng(seed, STREAM_IDENTITY, identity)
    skin = r.uniform(0.45, 0.95) * np.array([1.0, r.uniform(0.68, 0.88), r.uniform(0.5, 0.78)])
    return {
        "head_rx": r.uniform(0.27, 0.37), "head_ry": r.uniform(0.36, 0.45),
        "skin": skin, "hair": r.uniform(0.03, 0.6) * np.array([1.0, r.uniform(0.55, 0.85), r.uniform(0.25, 0.6)]),
        "hairline": r.uniform(-0.75, -0.35), "fringe_amp": r.uniform(0.0, 0.25), "fringe_freq": r.uniform(1.0, 4.0),
        "eye_y": r.uniform(-0.28, -0.05), "eye_dx": r.uniform(0.28, 0.5), "eye_r": r.uniform(0.08, 0.15),
        "eye_aspect": r.uniform(0.4, 0.85), "iris": r.uniform(0.0, 0.6, 3),
        "brow_gap": r.uniform(0.12, 0.22), "brow_tilt": r.uniform(-0.35, 0.35), "brow_len": r.uniform(0.12, 0.22),
        "brow_thick": r.uniform(0.025, 0.07),
        "nose_len": r.uniform(0.15, 0.35), "nose_w": r.uniform(0.05, 0.13),
        "mouth_y": r.uniform(0.35, 0.58), "mouth_w": r.uniform(0.18, 0.4), "mouth_curve": r.uniform(-0.5, 0.5),
        "mouth_thick": r.uniform(0.035, 0.09), "lips": skin * r.uniform(0.45, 0.8) * np.array([1.1, 0.7, 0.7]),
        "marks": np.column_stack([r.uniform(-0.6, 0.6, 3), r.uniform(-0.5, 0.7, 3), r.uniform(0.03, 0.09, 3),
                                  r.uniform(0.0, 1.0, 3) < 0.6]),
        "tex_freq": r.uniform(3.0, 9.0), "tex_angle": r.uniform(0, math.pi), "tex_amp": r.uniform(0.02, 0.07),
    }


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage of ``distance < 0`` (signed distance in the same units as ``pixel``)."""
    return np.clip(0.5 - distance / (1.5 * pixel), 0.0, 1.0)


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float, pixel: float) -> np.ndarray:
    """Coverage of an axis-aligned ellipse (approximate signed distance, scaled by the smaller radius)."""
    return _soft((np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2) - 1.0) * min(rx, ry), pixel)


def _paint(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    image += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - image)


def render_identity(identity: int, sample: int, seed: int = 0, image_size: int = 112) -> np.ndarray:
    """Sample ``sample`` of ``identity`` as an ``(S, S, 3)`` uint8 RGB image, deterministic in all arguments."""
    p = identity_params(identity, seed)
    r = _rng(seed, STREAM_SAMPLE, identity, sample)
    s = image_size
    # Pose: rotation, scale, shift and a yaw-like horizontal squash that also slides the features.
    angle, scale = r.normal(0.0, 0.12), r.uniform(0.9, 1.1)
    shift = r.normal(0.0, 0.035, 2)
    yaw = r.uniform(-1.0, 1.0)
    squash = 1.0 - 0.15 * abs(yaw)
    ys, xs = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s - 0.5
    xs, ys = xs - shift[0], ys - shift[1]
    ca, sa = math.cos(angle), math.sin(angle)
    hx, hy = (ca * xs + sa * ys) / scale, (-sa * xs + ca * ys) / scale
    u = hx / (p["head_rx"] * squash)  # head-normalised coordinates: the head is the unit disc
    v = hy / p["head_ry"]
    pixel = 1.0 / (s * p["head_rx"] * scale)
    fu = u - 0.18 * yaw  # features slide towards the turned side

    # Background: a random colour with a random linear gradient.
    g_angle = r.uniform(0, 2 * math.pi)
    grad = (math.cos(g_angle) * xs + math.sin(g_angle) * ys)[..., None]
    image = np.clip(r.uniform(0.05, 0.95, 3) + r.uniform(0.0, 0.6) * grad, 0, 1).astype(np.float32)

    head = _soft(np.sqrt(u**2 + v**2) - 1.0, pixel)
    texture = 1.0 + p["tex_amp"] * np.sin(
        p["tex_freq"] * math.pi * (math.cos(p["tex_angle"]) * fu + math.sin(p["tex_angle"]) * v)
    )
    image += head[..., None] * (p["skin"] * texture[..., None] - image)
    hairline = p["hairline"] + p["fringe_amp"] * np.sin(p["fringe_freq"] * math.pi * fu)
    _paint(image, p["hair"], head * _soft(v - hairline, pixel))
    _paint(image, p["skin"] * 0.8, _ellipse(fu, v, 0.0, p["eye_y"] + 0.1 + p["nose_len"] / 2,
                                          p["nose_w"], p["nose_len"] / 2, pixel))
    blink = r.uniform(0.25, 1.0) if r.uniform() < 0.2 else 1.0
    for side in (-1.0, 1.0):
        ex, ey = side * p["eye_dx"], p["eye_y"]
        ry = p["eye_r"] * p["eye_aspect"] * blink
        _paint(image, (0.95, 0.95, 0.92), _ellipse(fu, v, ex, ey, p["eye_r"], ry, pixel))
        _paint(image, p["iris"], _ellipse(fu, v, ex, ey, 0.45 * p["eye_r"], min(0.45 * p["eye_r"], ry), pixel))
        # Brow: a thin bar tilted by brow_tilt, mirrored on the other side.
        bx, by = fu - ex, v - (ey - p["brow_gap"])
        t = side * p["brow_tilt"]
        along, across = math.cos(t) * bx + math.sin(t) * by, -math.sin(t) * bx + math.cos(t) * by
        bar = np.maximum(np.abs(along) - p["brow_len"], np.abs(across) - p["brow_thick"])
        _paint(image, p["hair"], _soft(bar, pixel))
    curve = p["mouth_curve"] + r.normal(0.0, 0.15)  # expression
    mouth_v = v - (p["mouth_y"] + curve * (fu / p["mouth_w"]) ** 2 * 0.1)
    mouth = np.maximum(np.abs(mouth_v) - p["mouth_thick"] / 2, np.abs(fu) - p["mouth_w"])
    _paint(image, p["lips"], _soft(mouth, pixel))
    for mx, my, mr, present in p["marks"]:
        if present:
            _paint(image, p["skin"] * 0.45, head * _ellipse(fu, v, mx, my, mr, mr, pixel))

    # Occlusion: a band over the eyes (sunglasses) or a random box, in image coordinates after pose.
    occ = r.uniform()
    if occ < 0.15:
        band = np.abs(v - p["eye_y"]) - r.uniform(0.08, 0.14)
        _paint(image, r.uniform(0.0, 0.3, 3), head * _soft(band, pixel))
    elif occ < 0.35:
        w, h = r.uniform(0.15, 0.45, 2)
        x0, y0 = r.uniform(-0.5, 0.5 - w), r.uniform(-0.5, 0.5 - h)
        box = (xs + shift[0] >= x0) & (xs + shift[0] < x0 + w) & (ys + shift[1] >= y0) & (ys + shift[1] < y0 + h)
        _paint(image, r.uniform(0.0, 1.0, 3), box.astype(np.float32))

    # Lighting and camera: gain, directional light, colour cast, gamma, noise.
    l_angle = r.uniform(0, 2 * math.pi)
    light = r.uniform(0.6, 1.25) * (1.0 + r.uniform(0.0, 0.7) * (math.cos(l_angle) * xs + math.sin(l_angle) * ys))
    image = image * light[..., None] * r.uniform(0.85, 1.15, 3)
    image = np.clip(image, 0.0, 1.0) ** r.uniform(0.8, 1.25)
    image = image + r.normal(0.0, r.uniform(0.005, 0.04), image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_pairs(identities: np.ndarray, samples_per_identity: int, num_pairs: int, seed: int = 0) -> np.ndarray:
    """``(num_pairs, 5)`` int64 rows ``(identity_a, sample_a, identity_b, sample_b, same)``.

    Even rows are same-identity pairs (two different samples), odd rows different identities, so every
    contiguous fold of the 10-fold protocol is balanced, as LFW's.
    """
    if len(identities) < 2 or samples_per_identity < 2:
        raise ValueError("verification pairs need at least 2 identities and 2 samples per identity")
    rows = np.empty((num_pairs, 5), dtype=np.int64)
    for k in range(num_pairs):
        r = _rng(seed, STREAM_PAIR, k)
        same = k % 2 == 0
        a, b = r.choice(identities, 2, replace=False)
        sa, sb = r.choice(samples_per_identity, 2, replace=False)
        rows[k] = (a, sa, a if same else b, sb, int(same))
    return rows


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


class SyntheticIdentities(Dataset):
    """Training samples ``(image (3,S,S) float [0,1], label int64)`` of identities ``0..num_identities-1``.

    ``augment``: the face family's training preset (``"flip"``, ``"small_set"``, ``"none"``; ``True`` / ``False``
    are ``"flip"`` / ``"none"``), applied to the rendered face as to a decoded photo.
    """

    def __init__(self, num_identities: int, samples_per_identity: int, image_size: int = 112, seed: int = 0,
                 augment: bool | FaceAugment = "flip") -> None:
        self.num_identities, self.samples = num_identities, samples_per_identity
        self.image_size, self.seed = image_size, seed
        self.transform = face_transform(image_size, augment)

    def __len__(self) -> int:
        return self.num_identities * self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        identity, sample = divmod(index, self.samples)
        return identity_sample(render_identity(identity, sample, self.seed, self.image_size), identity, self.transform)


class SyntheticPairs(Dataset):
    """Verification pairs of the given ``(P, 5)`` rows (see :func:`make_pairs`) as dicts."""

    def __init__(self, pairs: np.ndarray, image_size: int = 112, seed: int = 0) -> None:
        self.pairs, self.image_size, self.seed = pairs, image_size, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        ia, sa, ib, sb, same = (int(x) for x in self.pairs[index])
        return {
            "image_a": _to_tensor(render_identity(ia, sa, self.seed, self.image_size)),
            "image_b": _to_tensor(render_identity(ib, sb, self.seed, self.image_size)),
            "same": torch.tensor(bool(same)),
            "index": torch.tensor(index, dtype=torch.int64),
            "identity_a": f"id{ia:05d}",
            "identity_b": f"id{ib:05d}",
        }


class SyntheticImages(Dataset):
    """Every sample of some identities as ``{"image", "name"}`` for ``predict`` (name ``id00012/003``)."""

    def __init__(self, identities: np.ndarray, samples_per_identity: int, image_size: int = 112, seed: int = 0):
        self.identities, self.samples, self.image_size, self.seed = identities, samples_per_identity, image_size, seed

    def __len__(self) -> int:
        return len(self.identities) * self.samples

    def __getitem__(self, index: int) -> dict:
        k, sample = divmod(index, self.samples)
        identity = int(self.identities[k])
        image = render_identity(identity, sample, self.seed, self.image_size)
        return {"image": _to_tensor(image), "name": f"id{identity:05d}/{sample:03d}"}


class SyntheticFacesDataModule(BaseDataModule):
    """Synthetic identities: train on ``num_train_identities``, verify on pairs of unseen identities.

    Args:
        num_train_identities: classes of the training set (linked into the task as ``num_identities``).
        samples_per_identity: images per training identity.
        num_val_identities: disjoint identities the validation / test pairs and predictions come from.
        val_samples_per_identity: images per validation identity the pairs draw from.
        num_val_pairs: validation pairs, half same-identity (use a multiple of 20 for balanced folds).
        image_size: square side S of every image.
        seed: selects the whole dataset.
        augment: training augmentation, as the face DataModules': ``"flip"`` (arcface_torch's), ``"small_set"``
            (:func:`datamodules.faces.samples.small_set_augmentations`) or ``"none"``.
        batch_size: training images per batch; validation batches hold ``batch_size`` pairs.
    """

    predict_split = "predict"

    def __init__(
        self,
        num_train_identities: int = 500,
        samples_per_identity: int = 20,
        num_val_identities: int = 200,
        val_samples_per_identity: int = 10,
        num_val_pairs: int = 1000,
        image_size: int = 112,
        seed: int = 0,
        augment: bool | FaceAugment = "flip",
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if num_train_identities < 2:
            raise ValueError(f"num_train_identities={num_train_identities}: need at least 2 identities to train")
        try:
            face_augment(augment)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self.augment = augment
        self.num_train_identities, self.samples_per_identity = num_train_identities, samples_per_identity
        self.num_val_identities, self.val_samples_per_identity = num_val_identities, val_samples_per_identity
        self.num_val_pairs, self.image_size, self.seed = num_val_pairs, image_size, seed

    @property
    def num_identities(self) -> int:
        """Number of training identities (the size of the classifier)."""
        return self.num_train_identities

    @property
    def val_identities(self) -> np.ndarray:
        return np.arange(self.num_train_identities, self.num_train_identities + self.num_val_identities)

    def build_dataset(self, split: str) -> Dataset:
        """Train: the training identities; val and test: pairs of unseen identities; predict: their images."""
        if split == "train":
            return SyntheticIdentities(self.num_train_identities, self.samples_per_identity,
                                       image_size=self.image_size, seed=self.seed, augment=self.augment)
        if split == "test":
            return self.dataset("val")  # one set of verification pairs serves both
        if split == "val":
            pairs = make_pairs(self.val_identities, self.val_samples_per_identity, self.num_val_pairs, self.seed)
            return SyntheticPairs(pairs, self.image_size, self.seed)
        if split == "predict":
            return SyntheticImages(self.val_identities, self.val_samples_per_identity, self.image_size, self.seed)
        raise ValueError(f"unknown split {split!r}: expected train, val, test or predict")
