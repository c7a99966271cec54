"""Top-down keypoint geometry: person box -> affine crop, flips with left/right swaps, augmentation, checks.

Conventions (those of the official RLE code, Jeff-sjtu/res-loglikelihood-regression, ``rlepose/utils/
presets/simple_transform.py`` and ``rlepose/utils/transforms.py``, itself from HRNet / AlphaPose):

* Keypoints are ``(K, 3)`` float arrays ``(x, y, v)`` in pixels, COCO visibility ``v``: 0 unlabelled (x, y
  meaningless, COCO stores 0, 0), 1 labelled but occluded, 2 labelled and visible. v = 1 and v = 2 are both
  trained and evaluated (the official reader uses ``min(1, v)``); v = 0 is masked out.
* Pixel coordinates are those of ``cv2.warpAffine``: the centre of pixel column ``c`` is ``x = c``. A
  horizontal flip of an image ``w`` pixels wide therefore maps ``x -> w - 1 - x`` (the official
  ``flip_joints_3d``; mmpose 1.x uses the same for keypoints), and the keypoint order is permuted by a
  ``flip_index`` built from the ``left_*`` / ``right_*`` names.
* A person box becomes a crop region with the output aspect ratio (192:256 = w:h by default) and 1.25
  padding (``_box_to_center_scale``): ``center`` = box centre, ``scale`` = ``(w, h)`` of the region in pixels
  (``pixel_std = 1``; mmpose 0.x divides by 200). The official reader first converts COCO ``[x, y, w, h]`` to
  ``x2 = x + w - 1`` (a 1-pixel-inclusive box, centre 0.5 px up-left of ours); we use ``x2 = x + w`` as
  mmpose 1.x does.
* The crop is the similarity ``u = k R(-r) (x - center) + (W / 2, H / 2)`` with ``k = W / scale_w``: the
  official ``get_affine_transform`` (three-point construction) written in closed form, in float64.
  Only ``scale_w`` is used, as there: the region's height follows from the aspect ratio.

Training augmentation (``TopDownAffine(train=True)``, the official COCO recipe ``256x192_res50_regress-flow.
yaml``, REFERENCE.md §8.4), in the official order: half-body (p 0.3 when more than 3 keypoints are
labelled), scale ``x U(1 - 0.25, 1 + 0.25)``, rotation ``U(-45, 45)`` degrees with probability 0.5 (else 0),
horizontal flip with probability 0.5. The flip is folded into the affine matrix (one ``warpAffine`` of the
unflipped image gives the same pixels as flipping the image first, as the official code does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_UPPER_BODY_IDS: tuple[int, ...] = tuple(range(11))  # nose .. wrists (the official / HRNet split)
# The official (and HRNet / mmpose 0.x) half-body picks the upper body when ``np.random.randn() < 0.5``,
# i.e. with probability Phi(0.5), not 0.5; we keep that probability, written out.
HALF_BODY_UPPER_PROB = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
DEFAULT_INPUT_SIZE = (256, 192)  # (H, W)
_SIDE_WORD = re.compile(r"(?:^|(?<=[_\- ]))(left|right)(?=$|[_\- ])", re.IGNORECASE)


# ----------------------------------------------------------------------------- names and checks
def _swap_side(name: str) -> str | None:
    """``left_wrist`` -> ``right_wrist``: swap a whole ``left`` / ``right`` word (separated by ``_``, ``-`` or a
    space, any case, case kept); None when the name has no side."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    swapped, count = _SIDE_WORD.subn(swap, name)
    return swapped if count else None


def flip_index_from_names(names: Sequence[str], where: str = "keypoint names") -> list[int]:
    """``flip_index[k]`` = the keypoint ``k`` becomes in a mirror image, from ``left_*`` / ``right_*`` names.

    Keypoints without a side (``nose``) map to themselves. A side without its partner is an error naming it.
    """
    position = {n: i for i, n in enumerate(names)}
    if len(position) != len(names):
        raise ValueError(f"{where}: duplicate keypoint names in {list(names)}")
    index = []
    for i, n in enumerate(names):
        partner = _swap_side(n)
        if partner is None:
            index.append(i)
        elif partner not in position:
            raise ValueError(f"{where}: keypoint {n!r} has no mirror partner {partner!r}")
        else:
            index.append(position[partner])
    return index


def flip_pairs_from_names(names: Sequence[str], where: str = "keypoint names") -> list[tuple[int, int]]:
    """The ``(left, right)`` index pairs (each pair once, lower index first) of :func:`flip_index_from_names`."""
    index = flip_index_from_names(names, where)
    return [(i, j) for i, j in enumerate(index) if i < j]


def validate_keypoints(values: Any, num_keypoints: int, where: str) -> np.ndarray:
    """A COCO ``keypoints`` list ``[x1, y1, v1, ...]`` as a ``(K, 3)`` float32 array, or a clear error.

    Args:
        values: the json value.
        num_keypoints: K (from the category's ``keypoints`` names or the config).
        where: names the record in messages, e.g. ``"annotation 183126 in person_keypoints_val2017.json"``.

    Raises:
        ValueError: not a flat list of numbers, wrong length (!= 3K), a non-finite coordinate of a labelled
            keypoint, or a visibility outside {0, 1, 2}.
    """
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{where}: keypoints must be a flat list of numbers [x1, y1, v1, ...], got {values!r:.200}")
    if len(values) != 3 * num_keypoints:
        raise ValueError(f"{where}: keypoints has {len(values)} values, expected {3 * num_keypoints} "
                         f"(x, y, v for each of {num_keypoints} keypoints)")
    kpts = np.asarray(values, dtype=np.float64).reshape(num_keypoints, 3)
    bad_v = ~np.isin(kpts[:, 2], (0, 1, 2))
    if bad_v.any():
        k = int(np.flatnonzero(bad_v)[0])
        raise ValueError(f"{where}: keypoint {k} has visibility {kpts[k, 2]:g}, expected 0 (unlabelled), "
                         f"1 (occluded) or 2 (visible)")
    labelled = kpts[:, 2] > 0
    bad_xy = labelled & ~np.isfinite(kpts[:, :2]).all(axis=1)
    if bad_xy.any():
        k = int(np.flatnonzero(bad_xy)[0])
        raise ValueError(f"{where}: keypoint {k} is labelled (v={int(kpts[k, 2])}) but has a non-finite position "
                         f"({kpts[k, 0]}, {kpts[k, 1]})")
    return kpts.astype(np.float32)


def validate_box_xywh(box: Any, where: str) -> np.ndarray:
    """A COCO ``[x, y, w, h]`` person box as float64 ``(4,)``; zero or negative size and non-finite values raise.

    A top-down crop needs an extent: unlike in detection, a zero-size box cannot be skipped silently when
    it is the box a pose is asked for. Readers that *skip* such annotations for training should check first.
    """
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        raise ValueError(f"{where}: bbox must be 4 numbers [x, y, width, height], got {box!r}")
    arr = np.asarray(box, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: bbox {list(box)} has a non-finite value")
    if arr[2] <= 0 or arr[3] <= 0:
        raise ValueError(f"{where}: bbox {list(box)} has zero or negative size (width {arr[2]:g}, height "
                         f"{arr[3]:g}); a top-down crop needs a box with an extent")
    return arr


# ----------------------------------------------------------------------------- geometry
def box_xywh_to_center_scale(box_xywh: Sequence[float] | np.ndarray, aspect_ratio: float = 192 / 256,
                             padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Crop region of a person box: ``center (2,)``, ``scale (2,) = (w, h)`` pixels (official ``_box_to_center_scale``).

    The box is widened or heightened (never shrunk) to ``w / h = aspect_ratio`` about its centre, then
    multiplied by ``padding``.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    center = np.array([x + w * 0.5, y + h * 0.5])
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w, h]) * padding


def center_scale_to_box_xyxy(center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The crop region ``[x0, y0, x1, y1]`` (without rotation) of ``center`` / ``scale``."""
    center, scale = np.asarray(center, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    return np.concatenate([center - scale / 2, center + scale / 2])


def get_affine_transform(center: Sequence[float] | np.ndarray, scale: Sequence[float] | np.ndarray,
                         rotation: float, output_size: tuple[int, int], inverse: bool = False) -> np.ndarray:
    """``(2, 3)`` float64 matrix mapping image pixels to the ``output_size = (W, H)`` crop (or back, ``inverse``).

    ``u = k R(-r) (x - center) + (W / 2, H / 2)`` with ``k = W / scale[0]`` and ``r = rotation`` in degrees:
    the official ``get_affine_transform`` (which solves the same map from three point pairs in float32).
    """
    cx, cy = float(center[0]), float(center[1])
    out_w, out_h = float(output_size[0]), float(output_size[1])
    if float(scale[0]) <= 0 or out_w <= 0 or out_h <= 0:
        raise ValueError(f"get_affine_transform: scale {tuple(scale)} and output_size {output_size} must be positive")
    k = out_w / float(scale[0])
    r = math.radians(rotation)
    cos, sin = math.cos(r), math.sin(r)
    if not inverse:
        a = k * np.array([[cos, sin], [-sin, cos]])  # k R(-r)
        t = np.array([out_w / 2, out_h / 2]) - a @ np.array([cx, cy])
    else:
        a = np.array([[cos, -sin], [sin, cos]]) / k  # R(r) / k
        t = np.array([cx, cy]) - a @ np.array([out_w / 2, out_h / 2])
    return np.concatenate([a, t[:, None]], axis=1)


def hflip_matrix(image_width: int) -> np.ndarray:
    """``(2, 3)`` matrix of the horizontal mirror ``x -> w - 1 - x`` of an image ``w`` pixels wide."""
    return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]])


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer o inner`` of two ``(2, 3)`` affine matrices (``inner`` applied first)."""
    return outer[:, :2] @ inner + np.concatenate([np.zeros((2, 2)), outer[:, 2:]], axis=1)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse ``(2, 3)`` map of an invertible ``(2, 3)`` affine matrix (float64): crop -> image for a crop's
    matrix, whatever it holds (flip, rotation, scale)."""
    full = np.concatenate([np.asarray(matrix, dtype=np.float64), [[0.0, 0.0, 1.0]]], axis=0)
    return np.linalg.inv(full)[:2]


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine matrix to ``(..., 2)`` points (float64 result)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def crop_image(image: np.ndarray, matrix: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine`` of an ``(H, W, C)`` image to ``output_size = (W, H)``: bilinear, zero border."""
    return cv2.warpAffine(image, matrix, (int(output_size[0]), int(output_size[1])), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def flip_keypoints(keypoints: np.ndarray, image_width: int, flip_index: Sequence[int]) -> np.ndarray:
    """Keypoints of the mirrored image: ``x -> w - 1 - x`` and the order permuted by ``flip_index``.

    ``keypoints`` is ``(K, 2+)`` (extra columns, e.g. visibility, move with their keypoint). Unlabelled
    keypoints (``v = 0`` in a third column) keep their stored position (COCO's 0, 0).
    """
    out = np.array(keypoints, dtype=np.float64, copy=True)
    labelled = out[:, 2] > 0 if out.shape[1] > 2 else np.ones(len(out), dtype=bool)
    out[labelled, 0] = image_width - 1 - out[labelled, 0]
    return out[list(flip_index)]


def crop_points_to_image(points: np.ndarray, center: np.ndarray, scale: np.ndarray,
                         output_size: tuple[int, int], rotation: float = 0.0) -> np.ndarray:
    """Map ``(..., 2)`` points in crop pixels (a prediction) back to the original image (inverse affine).

    ``center`` / ``scale`` describe the crop (e.g. from :func:`box_xywh_to_center_scale` of the person box,
    the ``center`` / ``scale`` a :class:`TopDownAffine` sample carries); ``output_size = (W, H)`` of the crop.
    """
    return transform_points(points, get_affine_transform(center, scale, rotation, output_size, inverse=True))


def half_body_center_scale(keypoints: np.ndarray, upper_body_ids: Sequence[int], rng: np.random.Generator,
                           aspect_ratio: float = 192 / 256, upper_prob: float = HALF_BODY_UPPER_PROB,
                           padding: float = 1.5) -> tuple[np.ndarray, np.ndarray] | None:
    """Crop region around the upper or the lower body's labelled keypoints (official ``half_body_transform``).

    The upper body is chosen with probability ``upper_prob`` if it has more than 2 labelled keypoints, else
    the lower body if it has more than 2, else the upper. None if the chosen part has fewer than 2. The
    region is centred on the keypoints' mean, spans their extent at ``aspect_ratio``, times ``padding``.
    """
    labelled = keypoints[:, 2] > 0
    upper_mask = np.zeros(len(keypoints), dtype=bool)
    upper_mask[list(upper_body_ids)] = True
    upper = keypoints[labelled & upper_mask, :2]
    lower = keypoints[labelled & ~upper_mask, :2]
    if rng.random() < upper_prob and len(upper) > 2:
        selected = upper
    else:
        selected = lower if len(lower) > 2 else upper
    if len(selected) < 2:
        return None
    center = selected.mean(axis=0).astype(np.float64)
    w, h = (selected.max(axis=0) - selected.min(axis=0)).astype(np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    return center, np.array([w, h]) * padding


# ----------------------------------------------------------------------------- the sample transform
@dataclass
class TopDownSample:
    """One person crop.

    Attributes:
        image: ``(H, W, 3)`` uint8 crop.
        keypoints: ``(K, 3)`` float32 ``(x, y, v)`` in crop pixels; ``v`` as in the annotation (after a flip,
            permuted with the keypoints); unlabelled keypoints are ``(0, 0, 0)``. Keypoints may fall outside
            the crop: the official code still trains them (only their visibility decides).
        center, scale: ``(2,)`` float64 crop region in original-image pixels (after augmentation).
        rotation: degrees.
        flipped: whether the crop shows the mirrored person.
        matrix: ``(2, 3)`` float64 image -> crop map actually applied (flip included).
    """

    image: np.ndarray
    keypoints: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    rotation: float
    flipped: bool
    matrix: np.ndarray


class TopDownAffine:
    """Person box -> crop of ``input_size``, with the official training augmentation when ``train``.

    Args:
        input_size: ``(H, W)`` of the crop (256 x 192 in the paper).
        train: apply half-body, scale, rotation and flip (else the plain padded box crop).
        flip_index: keypoint permutation under a mirror (:func:`flip_index_from_names`); None disables flips.
        flip_prob, rotation, rotation_prob, scale_factor: 0.5, 45 degrees, 0.5, 0.25 (official COCO config).
        half_body_prob, half_body_min_keypoints: 0.3 and 3 (half-body needs *more* than 3 labelled).
        upper_body_ids: indices of the upper-body keypoints; None disables half-body (COCO:
            :data:`COCO_UPPER_BODY_IDS`).
        padding: box padding (1.25).

    ``__call__(image (H, W, 3) uint8, keypoints (K, 3), box_xywh, rng, where="")`` returns a
    :class:`TopDownSample`; ``rng`` (a ``numpy.random.Generator``) drives every random choice, so a
    DataModule seeds it per sample / worker. ``where`` names the annotation in errors.
    """

    def __init__(self, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE, *, train: bool = False,
                 flip_index: Sequence[int] | None = None, flip_prob: float = 0.5, rotation: float = 45.0,
                 rotation_prob: float = 0.5, scale_factor: float = 0.25, half_body_prob: float = 0.3,
                 half_body_min_keypoints: int = 3, upper_body_ids: Sequence[int] | None = None,
                 padding: float = 1.25) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.output_wh = (self.input_size[1], self.input_size[0])
        self.aspect_ratio = self.input_size[1] / self.input_size[0]
        self.train = train
        self.flip_index = None if flip_index is None else list(flip_index)
        self.flip_prob = flip_prob
        self.rotation = rotation
        self.rotation_prob = rotation_prob
        self.scale_factor = scale_factor
        self.half_body_prob = half_body_prob
        self.half_body_min_keypoints = half_body_min_keypoints
        self.upper_body_ids = None if upper_body_ids is None else list(upper_body_ids)
        self.padding = padding

    def __call__(self, image: np.ndarray, keypoints: np.ndarray, box_xywh: Sequence[float],
                 rng: np.random.Generator | None = None, where: str = "person box") -> TopDownSample:
        keypoints = np.asarray(keypoints, dtype=np.float64)
        if self.flip_index is not None and len(self.flip_index) != len(keypoints):
            raise ValueError(f"{where}: {len(keypoints)} keypoints but a flip_index of {len(self.flip_index)}")
        box = validate_box_xywh(box_xywh, where)
        center, scale = box_xywh_to_center_scale(box, self.aspect_ratio, self.padding)
        rotation, flipped = 0.0, False
        if self.train:
            # seeded from torch's generator: seed_everything, the DataLoader's per-worker seeds and a resumed run's
            # restored state decide the augmentation (a fresh default_rng() would make every run differ)
            rng = rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            labelled = int((keypoints[:, 2] > 0).sum())
            if (self.upper_body_ids is not None and labelled > self.half_body_min_keypoints
                    and rng.random() < self.half_body_prob):
                half = half_body_center_scale(keypoints, self.upper_body_ids, rng, self.aspect_ratio)
                if half is not None:
                    center, scale = half
            scale = scale * rng.uniform(1 - self.scale_factor, 1 + self.scale_factor)
            if rng.random() <= self.rotation_prob:
                rotation = float(rng.uniform(-self.rotation, self.rotation))
            flipped = self.flip_index is not None and rng.random() < self.flip_prob

        if flipped:
            width = image.shape[1]
            crop_center = np.array([width - 1 - center[0], center[1]])
            matrix = compose_affine(get_affine_transform(crop_center, scale, rotation, self.output_wh),
                                    hflip_matrix(width))
            order = self.flip_index
        else:
            matrix = get_affine_transform(center, scale, rotation, self.output_wh)
            order = list(range(len(keypoints)))
        xy = transform_points(keypoints[:, :2], matrix)
        out = np.concatenate([xy, keypoints[:, 2:3]], axis=1)[order]
        out[out[:, 2] <= 0, :2] = 0.0
        return TopDownSample(image=crop_image(image, matrix, self.output_wh), keypoints=out.astype(np.float32),
                             center=center, scale=scale, rotation=rotation, flipped=flipped, matrix=matrix)
