"""Synthetic shapes: images with boxes, masks and keypoints generated from ``(seed, index)`` alone.

Each image has a textured background (smooth noise, a linear gradient or stripes, random colours) and
up to ``max_objects`` filled shapes of random class, size, colour, position and rotation. Later shapes
paint over earlier ones, so every annotation describes the *visible* part: ``masks`` are the visible
pixels, ``boxes`` their bounding box, and objects left less than ``MIN_VISIBLE_FRACTION`` visible are
removed before painting (so no unannotated shape is ever drawn).

Pixel convention (as COCO and albumentations): pixel ``(row r, col c)`` covers ``[c, c+1) x [r, r+1)``,
so a box is ``[min col, min row, max col + 1, max row + 1]`` of its mask.

Keypoints: every shape has a centre and four points on its rotated local axes ("top", "right",
"bottom", "left"), placed inside the shape at ``KEYPOINT_RADIUS_FRACTION`` of the distance from the
centre to the outline. A shape's rotation is drawn within one period of its rotational symmetry
(e.g. +-45 deg for a square, none for a circle), so the keypoints are determined by what is visible
and a pose model can learn them. Every shape is mirror-symmetric about its local vertical axis, so a
horizontal image flip equals the shape at minus the angle with "left" and "right" swapped
(``KEYPOINT_FLIP_PAIRS``). Visibility follows COCO: 2 visible, 1 inside the image but hidden by a
later shape, 0 outside the image (x, y still hold the geometric position).

Only numpy and OpenCV are used; a 256x256 image takes about 2-3 ms of CPU time on one core.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
KEYPOINT_NAMES: tuple[str, ...] = ("center", "top", "right", "bottom", "left")
KEYPOINT_FLIP_PAIRS: tuple[tuple[int, int], ...] = ((2, 4),)
NUM_SHAPE_CLASSES = len(SHAPE_CLASSES)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

MIN_VISIBLE_FRACTION = 0.2  # objects hidden more than this are removed (too ambiguous to label)
MIN_VISIBLE_PIXELS = 12  # a handful of pixels carries no shape information
KEYPOINT_RADIUS_FRACTION = 0.6  # keypoints sit well inside the outline, not on its rasterised edge
SIZE_RANGE = (0.07, 0.6)  # shape diameter as a fraction of the image side, log-uniform (COCO small..large)
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision for vertex coordinates
_COARSE = 64  # resolution at which gradient / stripe backgrounds are computed before upsampling
# Sensor-like noise is a crop of one fixed bank of Gaussian samples: drawing 200k normals per image
# would cost more than the whole rendering, and a random crop of a fixed bank is just as deterministic.
_NOISE_BANK = np.random.default_rng(20240531).standard_normal((512, 512, 3), dtype=np.float32)


def _regular_star(points: int, outer: float, inner: float) -> np.ndarray:
    """Star polygon with one point straight up (``-y`` in image coordinates)."""
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _local_polygons() -> dict[str, np.ndarray]:
    """Outline of each class in local unit coordinates, centred at the origin, "top" towards ``-y``."""
    circle = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
    h = 0.35  # half width of a cross arm
    triangle_r = 1.15  # circumradius: the centroid sits at the origin
    return {
        "circle": np.stack([np.cos(circle), np.sin(circle)], axis=1),
        "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
        "triangle": np.array(
            [
                [0.0, -triangle_r],
                [triangle_r * math.sqrt(3) / 2, triangle_r / 2],
                [-triangle_r * math.sqrt(3) / 2, triangle_r / 2],
            ]
        ),
        "star": _regular_star(5, outer=1.1, inner=0.5),
        "cross": np.array(
            [[-h, -1], [h, -1], [h, -h], [1, -h], [1, h], [h, h], [h, 1], [-h, 1], [-h, h], [-1, h], [-1, -h], [-h, -h]]
        ),
    }


# Rotational symmetry order of each class: rotation is drawn in [-180/n, 180/n) degrees (0 = none).
_SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "cross": 4}
_POLYGONS = tuple(_local_polygons()[name].astype(np.float64) for name in SHAPE_CLASSES)
# Local directions of the keypoints, in KEYPOINT_NAMES order (image y points down).
_KEYPOINT_DIRECTIONS = np.array([[0.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def _ray_exit_distance(polygon: np.ndarray, direction: np.ndarray) -> float:
    """Distance from the origin along ``direction`` to the outermost crossing of the polygon outline."""
    a = polygon
    b = np.roll(polygon, -1, axis=0)
    e = b - a
    # Solve t * d = a + s * e for (t, s) per edge (Cramer's rule); parallel edges give det == 0.
    det = direction[0] * (-e[:, 1]) - direction[1] * (-e[:, 0])
    ok = np.abs(det) > 1e-12
    t = (a[:, 0] * (-e[:, 1]) - a[:, 1] * (-e[:, 0])) / np.where(ok, det, 1.0)
    s = (direction[0] * a[:, 1] - direction[1] * a[:, 0]) / np.where(ok, det, 1.0)
    hit = ok & (t > 0) & (s >= -1e-9) & (s <= 1 + 1e-9)
    return float(t[hit].max())


def _local_keypoints(polygon: np.ndarray) -> np.ndarray:
    """``(K, 2)`` keypoints of one class in local coordinates (centre, then the four axis points)."""
    out = np.zeros((NUM_KEYPOINTS, 2))
    for k, d in enumerate(_KEYPOINT_DIRECTIONS[1:], start=1):
        out[k] = KEYPOINT_RADIUS_FRACTION * _ray_exit_distance(polygon, d) * d
    return out


_KEYPOINTS = tuple(_local_keypoints(p) for p in _POLYGONS)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size, 3)`` float32 texture: smooth colour noise, a linear gradient, or soft stripes.

    Textures are computed on a coarse grid and upsampled: they are smooth, and this keeps them cheap.
    """
    kind = int(rng.integers(3))
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    if kind == 0:
        g = int(rng.integers(2, 6))
        # Blobs of pure random colour look like objects; a 30% pull towards their mean keeps them soft.
        coarse = rng.uniform(0.0, 255.0, size=(g, g, 3)).astype(np.float32)
        coarse = 0.7 * coarse + 0.3 * coarse.mean(axis=(0, 1))
        return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    angle = rng.uniform(0.0, 2 * math.pi)
    coords = (np.arange(_COARSE, dtype=np.float32) + 0.5) / _COARSE
    proj = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)  # (h, w)
    if kind == 1:
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    else:
        freq = rng.uniform(3.0, 12.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        t = np.clip(0.5 + 1.5 * np.sin(2 * math.pi * freq * proj + phase), 0.0, 1.0)
    coarse = c0 + t[..., None] * (c1 - c0)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)


def _object_colour(rng: np.random.Generator, reference: np.ndarray) -> np.ndarray:
    """A random colour at least a clear margin away from ``reference`` (the background under the shape)."""
    colour = rng.uniform(0.0, 255.0, size=3)
    for _ in range(8):  # bounded: the last draw is kept even if close, shape edges still show it
        if np.abs(colour - reference).mean() >= 60.0:
            break
        colour = rng.uniform(0.0, 255.0, size=3)
    return colour.astype(np.float32)


def render_shapes(
    index: int,
    seed: int = 0,
    image_size: int = 256,
    max_objects: int = 6,
    size_range: tuple[float, float] = SIZE_RANGE,
) -> dict[str, np.ndarray]:
    """Render synthetic image ``index`` of the stream ``seed``; same arguments, same output.

    Args:
        index: image number, >= 0.
        seed: stream number, >= 0 (a DataModule uses different seeds for train and validation).
        image_size: side of the square image in pixels.
        max_objects: the number of shapes drawn is uniform in ``[1, max_objects]`` before occlusion
            removes any (so an image may end up with fewer, rarely none).
        size_range: (min, max) shape diameter as a fraction of the image side, sampled log-uniformly.

    Returns:
        A dict with ``image`` (H, W, 3) uint8; ``boxes`` (N, 4) float32 xyxy pixels of the visible
        part; ``labels`` (N,) int64 in ``[0, len(SHAPE_CLASSES))``; ``masks`` (N, H, W) bool visible
        pixels; ``semantic`` (H, W) uint8 with 0 = background and ``k + 1`` = class ``k``;
        ``keypoints`` (N, K, 3) float32 ``(x, y, visibility)`` with K = ``len(KEYPOINT_NAMES)``.
        Objects are in painting order (later ones are on top).
    """
    if index < 0 or seed < 0:
        raise ValueError(f"render_shapes: index and seed must be >= 0, got index={index}, seed={seed}")
    if image_size < 16:
        raise ValueError(f"render_shapes: image_size must be >= 16, got {image_size}")
    if not 0 <= max_objects <= 254:  # object ids live in a uint8 map
        raise ValueError(f"render_shapes: max_objects must be in [0, 254], got {max_objects}")
    if not 0 < size_range[0] <= size_range[1] <= 1:
        raise ValueError(f"render_shapes: size_range must satisfy 0 < min <= max <= 1, got {size_range}")
    rng = np.random.default_rng([seed, index])
    size = image_size
    background = _background(rng, size)

    n = int(rng.integers(1, max_objects + 1)) if max_objects > 0 else 0
    labels = rng.integers(NUM_SHAPE_CLASSES, size=n)
    log_lo, log_hi = math.log(size_range[0] * size), math.log(size_range[1] * size)
    radii = np.exp(rng.uniform(log_lo, log_hi, size=n)) / 2
    centres = rng.uniform(0.05 * size, 0.95 * size, size=(n, 2))
    turns = rng.uniform(-0.5, 0.5, size=n)  # fraction of the class's symmetry period

    full_masks = np.zeros((n, size, size), dtype=np.uint8)
    keypoints = np.zeros((n, NUM_KEYPOINTS, 3), dtype=np.float32)
    colours = np.zeros((n, 3), dtype=np.float32)
    for i in range(n):
        cls = int(labels[i])
        order = _SYMMETRY[SHAPE_CLASSES[cls]]
        theta = 2 * math.pi * turns[i] / order if order else 0.0
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, -s], [s, c]])
        to_image = lambda local: centres[i] + radii[i] * local @ rot.T  # noqa: E731
        outline = to_image(_POLYGONS[cls])
        # fillPoly takes pixel-centre coordinates (centre of pixel c is c + 0.5 in ours), in fixed point.
        pts = np.round((outline - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(full_masks[i], [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
        kp = to_image(_KEYPOINTS[cls])
        keypoints[i, :, :2] = kp
        pix = np.floor(kp).astype(np.int64)
        inside = (pix >= 0).all(axis=1) & (pix < size).all(axis=1)
        # Keypoints lie strictly inside the continuous shape; on tiny shapes the rasteriser can round
        # their pixel out, so it is forced in to keep "visible" == "pixel in the visible mask" exact.
        full_masks[i, pix[inside, 1], pix[inside, 0]] = 1
        cy, cx = np.clip(centres[i].astype(np.int64), 0, size - 1)[::-1]
        colours[i] = _object_colour(rng, background[cy, cx])
    shading = rng.uniform(-25.0, 25.0, size=(n, 2)).astype(np.float32)
    noise_sigma = float(rng.uniform(0.0, 8.0))
    noise_offset = rng.integers(0, _NOISE_BANK.shape[0] - size + 1, size=2) if size <= _NOISE_BANK.shape[0] else None

    def paint(order: np.ndarray) -> np.ndarray:
        """Object id map: 0 background, j + 1 for object ``order[j]``, later objects on top."""
        ids = np.zeros((size, size), dtype=np.uint8)
        for j, i in enumerate(order):
            np.copyto(ids, j + 1, where=full_masks[i].view(bool))
        return ids

    candidates = np.arange(n)
    ids = paint(candidates)
    full_area = np.array([cv2.countNonZero(full_masks[i]) for i in range(n)], dtype=np.int64)
    visible_area = np.array([cv2.countNonZero((ids == i + 1).view(np.uint8)) for i in range(n)], dtype=np.int64)
    keep = (visible_area >= MIN_VISIBLE_PIXELS) & (visible_area >= MIN_VISIBLE_FRACTION * np.maximum(full_area, 1))
    if not keep.all():
        # Removing a shape only uncovers the others, so one repaint settles every visibility.
        candidates = candidates[keep]
        ids = paint(candidates)

    m = len(candidates)
    masks = ids[None] == np.arange(1, m + 1, dtype=np.uint8)[:, None, None]
    boxes = np.zeros((m, 4), dtype=np.float32)
    image = background
    for j, i in enumerate(candidates):
        x0, y0, w, h = cv2.boundingRect(masks[j].view(np.uint8))  # extent of the non-zero pixels
        x1, y1 = x0 + w, y0 + h
        boxes[j] = (x0, y0, x1, y1)
        # Fill with the object's colour plus a mild linear shading across the shape.
        gx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - centres[i, 0]) * (shading[i, 0] / radii[i])
        gy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - centres[i, 1]) * (shading[i, 1] / radii[i])
        fill = colours[i] + (gy[:, None] + gx[None, :])[..., None]
        np.copyto(image[y0:y1, x0:x1], fill, where=masks[j, y0:y1, x0:x1, None])
    if noise_sigma > 0.5:
        if noise_offset is None:  # images larger than the bank: draw fresh noise
            noise = rng.standard_normal((size, size, 3), dtype=np.float32)
        else:
            oy, ox = noise_offset
            noise = _NOISE_BANK[oy : oy + size, ox : ox + size]
        image = cv2.scaleAdd(noise, noise_sigma, image)
    image = np.clip(image, 0.0, 255.0).astype(np.uint8)

    kept_labels = labels[candidates].astype(np.int64)
    lut = np.zeros(256, dtype=np.uint8)
    lut[1 : m + 1] = kept_labels + 1
    semantic = cv2.LUT(ids, lut)

    kps = keypoints[candidates]
    pix = np.floor(kps[..., :2]).astype(np.int64)
    inside = (pix >= 0).all(axis=-1) & (pix < size).all(axis=-1)
    px = np.clip(pix[..., 0], 0, size - 1)
    py = np.clip(pix[..., 1], 0, size - 1)
    on_top = ids[py, px] == (np.arange(1, m + 1)[:, None])
    kps[..., 2] = np.where(inside, np.where(on_top, 2.0, 1.0), 0.0)
    return {
        "image": image,
        "boxes": boxes,
        "labels": kept_labels,
        "masks": masks,
        "semantic": semantic,
        "keypoints": kps.astype(np.float32),
    }
