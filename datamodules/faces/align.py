"""5-point face alignment: the step between a face detector and the recogniser (insightface ``norm_crop``).

The 5 landmarks (in this order: the eye on the image's left, the other eye, the nose tip, the mouth corner
on the image's left, the other mouth corner; as RetinaFace / SCRFD output them) are mapped onto
arcface_torch's template by the least-squares similarity transform (rotation, uniform scale, translation:
Umeyama 1991, "Least-squares estimation of transformation parameters between two point patterns", eq. 40-42,
which is what ``skimage.transform.SimilarityTransform.estimate`` computes and insightface's
``python-package/insightface/utils/face_align.py`` ``estimate_norm`` calls), and the image is warped with
``cv2.warpAffine`` (bilinear, constant black border) to the ``image_size`` square, as ``norm_crop`` does.

Where we differ from insightface: landmarks that do not determine a transform (all at one point, or not
finite) raise an error here; skimage returns a NaN matrix there and ``norm_crop`` warps to a black image.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks the network

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric import functional as fgeometric

# insightface ``arcface_dst``: where the 5 landmarks of a 112x112 arcface_torch training crop lie (x, y pixels).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """``(5, 2)`` float64 template for a square crop of side ``image_size``, as insightface's ``estimate_norm``.

    A multiple of 112 scales the 112 template; a multiple of 128 scales it by ``image_size / 128`` and shifts x by
    ``8 * image_size / 128`` (the 112 face centred in a 128 crop). Other sizes are refused, as there.
    """
    if image_size <= 0 or (image_size % 112 and image_size % 128):
        raise ValueError(f"image_size {image_size}: the arcface template is defined for multiples of 112 or 128")
    # float32 arithmetic first, as insightface scales its float32 array, then float64 for the estimate.
    if image_size % 112 == 0:
        ratio, shift = np.float32(image_size / 112.0), 0.0
    else:
        ratio = np.float32(image_size / 128.0)
        shift = 8.0 * float(ratio)
    template = ARCFACE_TEMPLATE * ratio
    template[:, 0] += np.float32(shift)
    return template.astype(np.float64)


def _points(points: Any, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 2:
        raise ValueError(f"{name}: expected (N, 2) points with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: not all finite: {array.tolist()}")
    return array


def estimate_similarity(src: Any, dst: Any) -> np.ndarray:
    """``(2, 3)`` float64 matrix ``M`` of the similarity transform minimising ``sum |M [src_i; 1] - dst_i|^2``.

    Umeyama's closed form (skimage ``SimilarityTransform.estimate``): with centred points and
    ``A = dst_c^T src_c / N = U S V^T``, the rotation is ``U diag(1, d) V^T`` with ``d = sign(det A)`` (no
    reflection), the scale ``trace(S diag(1, d)) / var(src)`` and the translation ``mean(dst) - s R mean(src)``.
    For 2-D points this is the same minimiser as the linear least squares over ``[[a, -b, tx], [b, a, ty]]``
    that ``cv2.estimateAffinePartial2D`` refines to.

    Args:
        src: ``(N, 2)`` points (e.g. detected landmarks), N >= 2.
        dst: ``(N, 2)`` points they should map onto (e.g. :func:`arcface_template`).

    Raises:
        ValueError: shapes differ, values not finite, or ``src`` has (numerically) no spread: all points at one
            place determine no scale or rotation.
    """
    src, dst = _points(src, "source landmarks"), _points(dst, "target landmarks")
    if src.shape != dst.shape:
        raise ValueError(f"source landmarks {src.shape} and target landmarks {dst.shape} differ in shape")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    # Relative test: a spread below ~1e-12 of the coordinates' magnitude is rounding noise, not a face.
    if src_var <= (1e-12 * max(1.0, float(np.abs(src).max()))) ** 2:
        raise ValueError(f"degenerate landmarks (all at one point, spread {math.sqrt(src_var):.3g} px): "
                         f"they determine no similarity transform: {src.tolist()}")
    a = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(a)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(landmarks: Any, image_size: int = 112) -> np.ndarray:
    """``(2, 3)`` float64 matrix taking image pixels to the aligned crop: insightface ``estimate_norm(lmk, image_size)``.

    Args:
        landmarks: ``(5, 2)`` x, y pixels in the order of the module docstring.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks (eyes, nose, mouth corners), got shape {landmarks.shape}")
    return estimate_similarity(landmarks, arcface_template(image_size))


def warp_face(image: np.ndarray, matrix: np.ndarray, image_size: int = 112, interpolation: int = cv2.INTER_LINEAR,
              border_value: float = 0.0) -> np.ndarray:
    """``(image_size, image_size, C)`` crop ``cv2.warpAffine(image, matrix, ...)`` (bilinear, constant border, as ``norm_crop``)."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (image_size, image_size), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)


def norm_crop(image: np.ndarray, landmarks: Any, image_size: int = 112) -> np.ndarray:
    """The aligned ``(image_size, image_size, C)`` face of ``image`` (``(H, W, C)`` uint8) given its 5 landmarks."""
    return warp_face(image, alignment_matrix(landmarks, image_size), image_size)


def transform_points(points: Any, matrix: np.ndarray) -> np.ndarray:
    """``(N, 2)`` points mapped by a ``(2, 3)`` affine matrix."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]


class FaceAlign(A.DualTransform):
    """albumentations transform: the aligned ``image_size`` square crop of a face from its 5 landmarks.

    The landmarks come from ``data[landmarks_key]`` (``(5, 2)`` x, y pixels) if the call has that key, else from
    the first 5 ``keypoints``. Everything is moved with the image: the keypoints (x, y; angle and scale as
    albumentations' affine transforms update them), the ``landmarks_key`` entry, masks (nearest neighbour).
    Use it first in a ``Compose`` with ``keypoint_params=A.KeypointParams(format="xy", remove_invisible=False)``
    when the landmarks are keypoints (landmarks outside the crop must not be dropped and renumbered).

    Args:
        image_size: side of the output crop (a multiple of 112 or 128).
        landmarks_key: the extra target holding the 5 landmarks.
        p: probability (1: always align).
    """

    def __init__(self, image_size: int = 112, landmarks_key: str = "landmarks", p: float = 1.0) -> None:
        arcface_template(image_size)  # refuses sizes without a template now, not at the first call
        self.image_size, self.landmarks_key = image_size, landmarks_key
        super().__init__(p=p)

    @property
    def targets(self) -> dict[str, Any]:
        return {**super().targets, self.landmarks_key: self.apply_to_landmarks}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        if data.get(self.landmarks_key) is not None:
            landmarks = np.asarray(data[self.landmarks_key], dtype=np.float64)
        elif data.get("keypoints") is not None and len(data["keypoints"]) >= 5:
            landmarks = np.asarray(data["keypoints"], dtype=np.float64)[:5, :2]
        else:
            raise ValueError(f"FaceAlign needs 5 landmarks: pass {self.landmarks_key}=(5, 2) array or at least 5 keypoints")
        matrix = alignment_matrix(landmarks, self.image_size)
        return {"matrix": matrix, "align_scale": float(np.hypot(*matrix[:, 0]))}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return warp_face(img, matrix, self.image_size)

    def apply_to_mask(self, mask: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return warp_face(mask, matrix, self.image_size, interpolation=cv2.INTER_NEAREST)

    def apply_to_keypoints(self, keypoints: np.ndarray, matrix: np.ndarray, align_scale: float, **params: Any) -> np.ndarray:
        if len(keypoints) == 0:
            return keypoints
        full = np.vstack([matrix, [0.0, 0.0, 1.0]])  # albumentations' keypoint affine takes 3x3
        out = fgeometric.keypoints_affine(keypoints, full, (self.image_size, self.image_size),
                                          {"x": align_scale, "y": align_scale}, cv2.BORDER_CONSTANT)
        out[:, :2] = transform_points(keypoints[:, :2], matrix)  # float64 positions (theirs go through float32)
        return out

    def apply_to_landmarks(self, landmarks: Any, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return transform_points(landmarks, matrix)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("image_size", "landmarks_key")


def read_landmarks_csv(path: str | os.PathLike, layout: str = "interleaved") -> dict[str, np.ndarray]:
    """``{image path: (5, 2) float64 landmarks}`` from a CSV of rows ``path, 10 numbers`` (file order kept).

    Args:
        path: the CSV; a first row whose numbers do not parse is taken as a header. Blank lines are skipped.
        layout: ``"interleaved"``: ``x1, y1, x2, y2, ..., x5, y5`` (insightface's ``(5, 2)``, CelebA);
            ``"planar"``: ``x1..x5, y1..y5`` (MTCNN's output order).

    Raises:
        ValueError: a row without exactly 11 fields, a number that does not parse or is not finite, a path listed
            twice; the message names the file and line.
    """
    if layout not in ("interleaved", "planar"):
        raise ValueError(f"layout {layout!r}: expected 'interleaved' or 'planar'")
    result: dict[str, np.ndarray] = {}
    lines: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or all(not field.strip() for field in row):
                continue
            where = f"{path}, line {number}"
            if len(row) != 11:
                raise ValueError(f"{where}: expected an image path and 10 numbers, got {len(row)} fields")
            try:
                values = np.array([float(v) for v in row[1:]], dtype=np.float64)
            except ValueError:
                if not result and not lines:  # a header row
                    lines["<header>"] = number
                    continue
                raise ValueError(f"{where}: landmarks {row[1:]} are not all numbers") from None
            if not np.isfinite(values).all():
                raise ValueError(f"{where}: landmarks {values.tolist()} are not all finite")
            image = row[0].strip()
            if image in lines:
                raise ValueError(f"{where}: {image} already has landmarks on line {lines[image]}")
            lines[image] = number
            result[image] = values.reshape(5, 2) if layout == "interleaved" else values.reshape(2, 5).T.copy()
    return result
