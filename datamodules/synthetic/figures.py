"""Synthetic stick figures with COCO-format person keypoints: the pose dataset behind ``make demo``.

Every image (``render_figures(index, seed)``, deterministic from the pair) holds 1-3 stick figures on a
textured background (:func:`datamodules.synthetic.shapes` backgrounds plus distractor strokes), with:

* a fixed 13-keypoint skeleton (:data:`FIGURE_KEYPOINT_NAMES`: head, shoulders, elbows, wrists, hips, knees,
  ankles) with a left / right structure: mirror pairs follow from the ``left_*`` / ``right_*`` names;
* pose variation: random limb angles and lengths, torso lean, global rotation (+-35 deg), scale (figure
  height 35-95 % of the image) and position (figures may leave the image partly);
* a front / back cue, since left and right are anatomical: a figure facing the camera (75 %) has its
  left limbs on the image right, a face (eyes) and a V-neck mark; a figure seen from behind has its left
  limbs on the image left and a plain hair-coloured head. A horizontal mirror maps a front figure to a
  front figure with the names swapped, so flip augmentation stays consistent;
* occlusion: later figures cover earlier ones and random occluder boxes / ellipses cover parts; visibility
  is COCO's: 2 visible, 1 labelled but covered, 0 unlabelled (outside the image, or covered and left
  unlabelled, as COCO annotators often do; x = y = 0 then, as in COCO files).

Pixel convention: a keypoint ``(x, y)`` is at the centre of pixel column ``x``, row ``y`` (OpenCV drawing and
``warpAffine``, the convention of the top-down pipeline in :mod:`datamodules.keypoints.geometry`: a mirror maps
``x -> w - 1 - x``); each box is the extent of the figure's visible pixels, ``[c0 - 0.5, r0 - 0.5, c1 - c0 + 1,
r1 - r0 + 1]``, and ``area`` is its visible pixel count (COCO's segment area).

:func:`write_figures_coco` writes the COCO layout ``root/annotations/person_keypoints_<split>.json`` +
``root/<split>/*.png``, which the COCO keypoint reader reads like the real thing (category ``keypoints``
names, 1-based ``skeleton`` as in COCO).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from datamodules.synthetic.shapes import _background

FIGURE_KEYPOINT_NAMES: tuple[str, ...] = (
    "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_FIGURE_KEYPOINTS = len(FIGURE_KEYPOINT_NAMES)
# 0-based limbs; written 1-based into the json's ``skeleton`` as COCO does.
FIGURE_SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (1, 2), (1, 3), (3, 5), (2, 4), (4, 6), (1, 7), (2, 8), (7, 8),
    (7, 9), (9, 11), (8, 10), (10, 12),
)
FIGURE_UPPER_BODY_IDS: tuple[int, ...] = tuple(range(7))  # head .. wrists, for half-body augmentation
# OKS sigmas for the 13 keypoints: COCO's for the same joints (shoulders .079, elbows .072, wrists .062, hips
# .107, knees .087, ankles .089); the head centre gets 0.05 (between COCO's nose .026 and ear .035 and the
# shoulders: a disc centre is less sharp than a nose tip). Stick figures cover ~0.28 of their box (median;
# COCO people roughly half), so the same pixel error costs more OKS here than on people.
FIGURE_OKS_SIGMAS: tuple[float, ...] = (0.05, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087,
                                        0.089, 0.089)
OCCLUDER_ID = 255
_SHIFT = 4  # cv2 drawing sub-pixel bits
_UNLABELLED_IF_COVERED = 0.3  # share of covered keypoints left unlabelled (v = 0)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel-centre coordinates -> cv2 fixed-point integers (``shift = _SHIFT``)."""
    return np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32)


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """A random colour, redrawn (bounded) until it differs clearly from ``avoid``."""
    c = rng.uniform(0, 255, 3)
    for _ in range(6):
        if avoid is None or np.abs(c - avoid).mean() > 60:
            break
        c = rng.uniform(0, 255, 3)
    return c


def _pose(rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """``(K, 2)`` keypoints of one figure in body units (height ~1, hip centre at 0, y down), and facing front."""
    lean = rng.normal(0, 0.12)
    up = np.array([math.sin(lean), -math.cos(lean)])
    across = np.array([math.cos(lean), math.sin(lean)])  # towards the figure's left when facing the camera
    k = np.zeros((NUM_FIGURE_KEYPOINTS, 2))
    neck = rng.uniform(0.28, 0.33) * up
    k[0] = neck + rng.uniform(0.10, 0.13) * np.array([math.sin(lean + rng.normal(0, 0.15)),
                                                      -math.cos(lean + rng.normal(0, 0.15))])
    shoulder, hip = rng.uniform(0.10, 0.13), rng.uniform(0.07, 0.10)
    for side, (s, e, w, h, kn, a) in ((1, (1, 3, 5, 7, 9, 11)), (-1, (2, 4, 6, 8, 10, 12))):
        k[s] = neck + side * shoulder * across
        k[h] = side * hip * across
        # Angles from "straight down", positive = away from the body on this side.
        a1 = rng.uniform(-0.3, 2.6)
        a2 = a1 + rng.uniform(-2.2, 0.4)
        down = lambda ang: -up * math.cos(ang) + side * across * math.sin(ang)  # noqa: E731
        k[e] = k[s] + rng.uniform(0.15, 0.18) * down(a1)
        k[w] = k[e] + rng.uniform(0.13, 0.16) * down(a2)
        l1 = rng.uniform(-0.25, 0.9)
        l2 = l1 + rng.uniform(-0.9, 0.3)
        k[kn] = k[h] + rng.uniform(0.22, 0.26) * down(l1)
        k[a] = k[kn] + rng.uniform(0.20, 0.24) * down(l2)
    front = bool(rng.random() < 0.75)
    if not front:  # seen from behind: the figure's left is on the image left
        k[:, 0] = -k[:, 0]
    return k, front


def _draw_figure(canvas: np.ndarray, owner: np.ndarray, fid: int, kpts: np.ndarray, height: float, front: bool,
                 up: np.ndarray, rng: np.random.Generator) -> None:
    """Paint one figure on ``canvas`` (float32 RGB) and its id on ``owner`` (uint8), same primitives on both."""
    hy, hx = np.clip(kpts[7, ::-1].astype(int), 0, np.array(canvas.shape[:2]) - 1)
    reference = canvas[hy, hx]
    skin, shirt, trousers, hair = (_colour(rng, reference) for _ in range(4))
    limb = max(2, int(round(0.045 * height)))
    head_r = max(2.0, 0.065 * height)
    shade = rng.uniform(0.75, 0.95)

    def line(a: int, b: int, colour: np.ndarray, thickness: int) -> None:
        p, q = tuple(_fixed(kpts[a])), tuple(_fixed(kpts[b]))
        cv2.line(canvas, p, q, colour.tolist(), thickness, cv2.LINE_AA, _SHIFT)
        cv2.line(owner, p, q, fid, thickness, cv2.LINE_8, _SHIFT)

    # Back limbs first (slightly darker), then the torso, then the front limbs, then the head.
    back_side, front_side = ((2, 4, 6, 8, 10, 12), (1, 3, 5, 7, 9, 11)) if rng.random() < 0.5 else \
        ((1, 3, 5, 7, 9, 11), (2, 4, 6, 8, 10, 12))
    for side, dim in ((back_side, shade), (front_side, 1.0)):
        s, e, w, h, kn, a = side
        line(h, kn, trousers * dim, limb + 1)
        line(kn, a, trousers * dim, limb)
    torso = _fixed(kpts[[1, 2, 8, 7]])
    cv2.fillPoly(canvas, [torso], shirt.tolist(), cv2.LINE_AA, _SHIFT)
    cv2.fillPoly(owner, [torso], fid, cv2.LINE_8, _SHIFT)
    for side, dim in ((back_side, shade), (front_side, 1.0)):
        s, e, w, h, kn, a = side
        line(s, e, shirt * dim, limb)
        line(e, w, skin * dim, max(2, limb - 1))
    line(1, 2, shirt, limb)
    if front:  # V-neck mark below the neck, pointing down the torso
        neck = (kpts[1] + kpts[2]) / 2
        width = 0.3 * np.linalg.norm(kpts[1] - kpts[2])
        across = (kpts[1] - kpts[2]) / max(np.linalg.norm(kpts[1] - kpts[2]), 1e-6)
        v = np.stack([neck + width * across, neck - width * across, neck - 1.6 * width * up])
        cv2.fillPoly(canvas, [_fixed(v)], (255 - shirt).tolist(), cv2.LINE_AA, _SHIFT)
    centre = tuple(_fixed(kpts[0]))
    radius = int(round(head_r * (1 << _SHIFT)))
    cv2.circle(canvas, centre, radius, (skin if front else hair).tolist(), -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(owner, centre, radius, fid, -1, cv2.LINE_8, _SHIFT)
    if front:  # eyes
        across = np.array([-up[1], up[0]])
        for sgn in (-1, 1):
            eye = kpts[0] + head_r * (0.4 * sgn * across + 0.15 * up)
            cv2.circle(canvas, tuple(_fixed(eye)), int(max(0.8, 0.18 * head_r) * (1 << _SHIFT)),
                       (0.25 * hair).tolist(), -1, cv2.LINE_AA, _SHIFT)
    else:  # hair over a skin-coloured neck stub
        cv2.circle(canvas, centre, int(round(0.55 * head_r * (1 << _SHIFT))), (0.8 * hair).tolist(), -1,
                   cv2.LINE_AA, _SHIFT)


def render_figures(index: int, seed: int = 0, image_size: int = 128, max_figures: int = 3) -> dict[str, np.ndarray]:
    """Render synthetic image ``index`` of stream ``seed``; same arguments, same output.

    Returns:
        A dict with ``image`` (S, S, 3) uint8 RGB; ``keypoints`` (N, K, 3) float32 ``(x, y, v)``
        (K = :data:`NUM_FIGURE_KEYPOINTS`); ``boxes_xywh`` (N, 4) float32 of the visible pixels;
        ``areas`` (N,) float32 visible pixel counts; ``masks`` (N, S, S) bool visible pixels; ``front`` (N,)
        bool. Figures with no visible pixel are dropped (N may be smaller than the number drawn).
    """
    if index < 0 or seed < 0:
        raise ValueError(f"render_figures: index and seed must be >= 0, got index={index}, seed={seed}")
    if image_size < 32:
        raise ValueError(f"render_figures: image_size must be >= 32, got {image_size}")
    if not 1 <= max_figures <= 200:
        raise ValueError(f"render_figures: max_figures must be in [1, 200], got {max_figures}")
    rng = np.random.default_rng([seed, index])
    size = image_size
    canvas = _background(rng, size).astype(np.float32)
    # Distractor strokes: limb-like clutter that is not a person.
    for _ in range(int(rng.integers(0, 3))):
        p, q = rng.uniform(0, size, (2, 2))
        cv2.line(canvas, tuple(_fixed(p)), tuple(_fixed(q)), _colour(rng).tolist(),
                 int(rng.integers(1, max(2, size // 40) + 1)), cv2.LINE_AA, _SHIFT)
    owner = np.zeros((size, size), dtype=np.uint8)

    n = int(rng.choice(np.arange(1, max_figures + 1), p=_figure_count_probs(max_figures)))
    all_kpts, fronts = [], []
    for i in range(n):
        body, front = _pose(rng)
        height = rng.uniform(0.35, 0.95) * size
        theta = math.radians(float(np.clip(rng.normal(0, 15), -35, 35)))
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = body @ rot.T * height
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        centre = rng.uniform(0.15 * size, 0.85 * size, 2)
        pts = pts - (lo + hi) / 2 + centre
        up = rot @ np.array([0.0, -1.0])
        _draw_figure(canvas, owner, i + 1, pts, height, front, up, rng)
        all_kpts.append(pts)
        fronts.append(front)
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.6 else 0):  # occluders
        c = rng.uniform(0, size, 2)
        axes = rng.uniform(0.06, 0.2, 2) * size
        colour = _colour(rng).tolist()
        if rng.random() < 0.5:
            pts = _fixed(c + axes * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]))
            cv2.fillPoly(canvas, [pts], colour, cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(owner, [pts], OCCLUDER_ID, cv2.LINE_8, _SHIFT)
        else:
            args = (tuple(_fixed(c)), tuple(_fixed(axes)), float(rng.uniform(0, 180)), 0.0, 360.0)
            cv2.ellipse(canvas, *args, colour, -1, cv2.LINE_AA, _SHIFT)
            cv2.ellipse(owner, *args, OCCLUDER_ID, -1, cv2.LINE_8, _SHIFT)
    noise_sigma = float(rng.uniform(0.0, 6.0))
    if noise_sigma > 0.5:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * noise_sigma
    image = np.clip(canvas, 0, 255).astype(np.uint8)

    keypoints, boxes, areas, masks, front_out = [], [], [], [], []
    for i, pts in enumerate(all_kpts):
        mask = owner == i + 1
        area = int(mask.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min() - 0.5, ys.min() - 0.5, xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        pix = np.round(pts).astype(np.int64)
        inside = (pix >= 0).all(axis=1) & (pix < size).all(axis=1)
        own = np.zeros(len(pts), dtype=bool)
        own[inside] = mask[pix[inside, 1], pix[inside, 0]]
        covered_labelled = rng.random(len(pts)) >= _UNLABELLED_IF_COVERED
        v = np.where(inside & own, 2, np.where(inside & covered_labelled, 1, 0))
        kp = np.concatenate([pts, v[:, None]], axis=1)
        kp[v == 0, :2] = 0.0
        keypoints.append(kp)
        areas.append(area)
        masks.append(mask)
        front_out.append(fronts[i])
    k = NUM_FIGURE_KEYPOINTS
    return {
        "image": image,
        "keypoints": np.asarray(keypoints, dtype=np.float32).reshape(-1, k, 3),
        "boxes_xywh": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "areas": np.asarray(areas, dtype=np.float32),
        "masks": np.asarray(masks, dtype=bool).reshape(-1, size, size),
        "front": np.asarray(front_out, dtype=bool),
    }


def _figure_count_probs(max_figures: int) -> np.ndarray:
    """1 figure most often, then 2, then 3 ... (weights 6, 3, 1, 1, ...), normalised."""
    w = np.array([6.0, 3.0] + [1.0] * max(0, max_figures - 2))[:max_figures]
    return w / w.sum()


def figures_category() -> dict:
    """The COCO ``categories[0]`` of the figures: person, keypoint names, 1-based skeleton."""
    return {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(FIGURE_KEYPOINT_NAMES),
            "skeleton": [[a + 1, b + 1] for a, b in FIGURE_SKELETON]}


def figures_coco_dict(num_images: int, seed: int = 0, image_size: int = 128, max_figures: int = 3,
                      image_dir: str | Path | None = None) -> dict:
    """The COCO keypoint json of ``num_images`` rendered images; writes ``<index>.png`` into ``image_dir`` if given."""
    images, annotations = [], []
    for index in range(num_images):
        s = render_figures(index, seed=seed, image_size=image_size, max_figures=max_figures)
        name = f"{index:06d}.png"
        if image_dir is not None:
            Image.fromarray(s["image"]).save(Path(image_dir) / name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
        for kp, box, area in zip(s["keypoints"], s["boxes_xywh"], s["areas"]):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [round(float(v), 2) for v in box], "area": float(area), "iscrowd": 0,
                "num_keypoints": int((kp[:, 2] > 0).sum()),
                "keypoints": [round(float(v), 3) if j % 3 < 2 else int(v) for j, v in enumerate(kp.reshape(-1))],
            })
    return {"info": {"description": "lit-tasks synthetic stick figures", "seed": seed, "image_size": image_size,
                     "max_figures": max_figures},
            "images": images, "annotations": annotations, "categories": [figures_category()]}


def write_figures_coco(root: str | Path, splits: dict[str, tuple[int, int]] | None = None, image_size: int = 128,
                       max_figures: int = 3) -> dict[str, Path]:
    """Write the COCO layout of the figures under ``root`` once; reuse it when it is already there.

    Args:
        root: output folder; gets ``annotations/person_keypoints_<split>.json`` and ``<split>/*.png``.
        splits: ``{split: (num_images, seed)}``; default ``{"train2017": (2000, 0), "val2017": (200, 1)}``
            (different seeds, so the splits share no image).
        image_size, max_figures: as :func:`render_figures`.

    Returns:
        ``{split: json path}``. A split whose json exists with the same parameters (``info``) is left as it
        is; an existing json with other parameters, or a non-empty image folder without a json, raises
        ``FileExistsError`` (nothing the user has is overwritten).
    """
    root = Path(root)
    splits = {"train2017": (2000, 0), "val2017": (200, 1)} if splits is None else splits
    out = {}
    for split, (num_images, seed) in splits.items():
        ann = root / "annotations" / f"person_keypoints_{split}.json"
        image_dir = root / split
        want = {"description": "lit-tasks synthetic stick figures", "seed": seed, "image_size": image_size,
                "max_figures": max_figures}
        if ann.exists():
            info = json.loads(ann.read_text()).get("info", {})
            count = len(list(image_dir.glob("*.png"))) if image_dir.is_dir() else 0
            if info != want or count != num_images:
                raise FileExistsError(f"{ann} exists with other contents (info {info}, {count} images); expected "
                                      f"{want} with {num_images} images: choose another root or remove it")
            out[split] = ann
            continue
        if image_dir.exists() and any(image_dir.iterdir()):
            raise FileExistsError(f"{image_dir} is not empty and has no {ann.name}: not overwriting it")
        image_dir.mkdir(parents=True, exist_ok=True)
        ann.parent.mkdir(parents=True, exist_ok=True)
        data = figures_coco_dict(num_images, seed=seed, image_size=image_size, max_figures=max_figures,
                                 image_dir=image_dir)
        tmp = ann.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(ann)  # the json appears only once every image is written
        out[split] = ann
    return out
