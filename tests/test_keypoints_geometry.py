"""Top-down geometry: affine crop vs the official construction, round trips measured on pixels, flips, checks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from datamodules.keypoints.geometry import (
    COCO_KEYPOINT_NAMES,
    COCO_UPPER_BODY_IDS,
    TopDownAffine,
    box_xywh_to_center_scale,
    center_scale_to_box_xyxy,
    compose_affine,
    crop_image,
    crop_points_to_image,
    flip_index_from_names,
    flip_keypoints,
    flip_pairs_from_names,
    get_affine_transform,
    half_body_center_scale,
    hflip_matrix,
    transform_points,
    validate_box_xywh,
    validate_keypoints,
)


def _official_affine(center, scale, rot, output_size, inv=False):
    """The official three-point ``get_affine_transform`` (rlepose/utils/transforms.py), float32 points."""
    src_w = scale[0]
    dst_w, dst_h = output_size
    rot_rad = np.pi * rot / 180
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_dir = np.array([0 * cs - src_w * -0.5 * sn, 0 * sn + src_w * -0.5 * cs])
    dst_dir = np.array([0, dst_w * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]], dtype=np.float32)

    src[2] = third(src[0], src[1])
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(dst, src) if inv else cv2.getAffineTransform(src, dst)


@pytest.mark.parametrize("rot", [0.0, 30.0, -45.0, 170.0])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_matches_official_construction(rot: float, inverse: bool) -> None:
    center, scale, out = np.array([321.5, 207.25]), np.array([150.0, 200.0]), (192, 256)
    ours = get_affine_transform(center, scale, rot, out, inverse=inverse)
    official = _official_affine(center, scale, rot, out, inv=inverse)
    # The official solves from float32 points: ~1e-5 relative on coordinates of a few hundred pixels.
    np.testing.assert_allclose(ours, official, atol=5e-3 if inverse else 2e-4)
    pts = np.array([[300.0, 180.0], [10.0, 400.0]])
    np.testing.assert_allclose(transform_points(pts, ours), pts @ official[:, :2].T + official[:, 2], atol=2e-2)


def test_box_to_center_scale_official_values() -> None:
    center, scale = box_xywh_to_center_scale([10, 20, 30, 80])  # w < 0.75 h: widened to 60
    np.testing.assert_allclose(center, [25, 60])
    np.testing.assert_allclose(scale, [75, 100])
    center, scale = box_xywh_to_center_scale([0, 0, 120, 40], aspect_ratio=0.75, padding=1.0)  # heightened
    np.testing.assert_allclose(scale, [120, 160])
    np.testing.assert_allclose(center_scale_to_box_xyxy(center, scale), [0, -60, 120, 100])


def _blob_image(points: np.ndarray, size=(300, 400), sigma=3.0, colours=None) -> np.ndarray:
    """(H, W, 3) uint8 image with a Gaussian blob (pixel-centre convention: pixel c at x = c) per point."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for i, (x, y) in enumerate(points):
        colour = np.array([255.0, 255.0, 255.0]) if colours is None else colours[i]
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))[..., None] * colour
    return np.clip(img, 0, 255).astype(np.uint8)


def _centroid(image: np.ndarray) -> np.ndarray:
    g = image[..., 0].astype(np.float64)
    g = np.where(g > 20, g, 0)
    yy, xx = np.mgrid[0 : g.shape[0], 0 : g.shape[1]]
    return np.array([(g * xx).sum() / g.sum(), (g * yy).sum() / g.sum()])


@pytest.mark.parametrize("rot, flip", [(0.0, False), (30.0, False), (-20.0, True)])
def test_crop_and_inverse_round_trip_on_pixels(rot: float, flip: bool) -> None:
    """A blob's centroid in the warped crop sits where the matrix maps the point, and maps back within 0.5 px."""
    point = np.array([[231.3, 140.7]])
    image = _blob_image(point)
    center, scale = box_xywh_to_center_scale([180, 60, 90, 160])
    out = (192, 256)
    if flip:
        crop_center = np.array([image.shape[1] - 1 - center[0], center[1]])
        matrix = compose_affine(get_affine_transform(crop_center, scale, rot, out), hflip_matrix(image.shape[1]))
        # Folding the flip into the matrix gives the pixels of the official "flip the image, then crop".
        flipped_first = np.ascontiguousarray(image[:, ::-1])
        official = crop_image(flipped_first, get_affine_transform(crop_center, scale, rot, out), out)
        assert np.abs(crop_image(image, matrix, out).astype(int) - official.astype(int)).max() <= 1
    else:
        matrix = get_affine_transform(center, scale, rot, out)
    crop = crop_image(image, matrix, out)
    assert crop.shape == (256, 192, 3)
    found = _centroid(crop)
    np.testing.assert_allclose(found, transform_points(point, matrix)[0], atol=0.5)
    inverse = get_affine_transform(crop_center if flip else center, scale, rot, out, inverse=True)
    back = transform_points(found, inverse)
    if flip:
        back[0] = image.shape[1] - 1 - back[0]
    np.testing.assert_allclose(back, point[0], atol=0.5)
    if not flip:
        np.testing.assert_allclose(crop_points_to_image(found, center, scale, out, rot), point[0], atol=0.5)


def test_flip_keypoints_swaps_pairs_and_mirrors() -> None:
    names = ("nose", "left_eye", "right_eye")
    index = flip_index_from_names(names)
    assert index == [0, 2, 1]
    kpts = np.array([[10.0, 5.0, 2], [20.0, 6.0, 1], [0.0, 0.0, 0]])
    out = flip_keypoints(kpts, image_width=100, flip_index=index)
    # x -> w - 1 - x (official flip_joints_3d); left/right exchanged; the unlabelled one stays (0, 0, 0).
    np.testing.assert_allclose(out, [[89.0, 5.0, 2], [0.0, 0.0, 0], [79.0, 6.0, 1]])
    np.testing.assert_allclose(flip_keypoints(out, 100, index), kpts)  # an involution


def test_flip_pairs_from_coco_names_match_official() -> None:
    assert flip_pairs_from_names(COCO_KEYPOINT_NAMES) == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12),
                                                          (13, 14), (15, 16)]
    assert flip_index_from_names(["Left-Hand", "RIGHT foot", "Right-Hand", "LEFT foot", "leftover"]) == [2, 3, 0, 1, 4]
    with pytest.raises(ValueError, match="'left_paw' has no mirror partner 'right_paw'"):
        flip_index_from_names(["nose", "left_paw"], where="category 1 in x.json")


def test_top_down_affine_flip_keeps_image_and_labels_consistent() -> None:
    """In a flipped training crop keypoint k sits on the blob of original keypoint flip_index[k]."""
    names = ("head", "left_hand", "right_hand", "left_foot", "right_foot")
    index = flip_index_from_names(names)
    pts = np.array([[200.0, 60.0], [150.0, 120.0], [250.0, 125.0], [170.0, 240.0], [235.0, 245.0]])
    colours = [np.eye(3)[i % 3] * 255 if i < 3 else np.array([255, 255, 0.0]) * (0.5 + 0.25 * (i - 3))
               for i in range(5)]
    image = _blob_image(pts, colours=colours, sigma=2.0)
    kpts = np.concatenate([pts, np.full((5, 1), 2.0)], axis=1)
    transform = TopDownAffine(train=True, flip_index=index, flip_prob=0.5, half_body_prob=0.0)
    seen = set()
    for seed in range(12):
        sample = transform(image, kpts, [140, 50, 120, 210], np.random.default_rng(seed))
        seen.add(sample.flipped)
        for k in range(5):
            source = index[k] if sample.flipped else k
            x, y = np.round(sample.keypoints[k, :2]).astype(int)
            if 0 <= x < 192 and 0 <= y < 256:
                got = sample.image[y, x].astype(float)
                want = colours[source]
                assert np.abs(got / max(got.max(), 1) - want / want.max()).max() < 0.35, (seed, k, got, want)
    assert seen == {True, False}


def test_top_down_affine_eval_is_plain_box_crop_and_deterministic() -> None:
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    kpts = np.array([[50.0, 40.0, 2], [0, 0, 0], [70.0, 90.0, 1]])
    sample = TopDownAffine(input_size=(64, 48))(image, kpts, [30, 20, 60, 80])
    center, scale = box_xywh_to_center_scale([30, 20, 60, 80], 48 / 64)
    np.testing.assert_allclose(sample.center, center)
    np.testing.assert_allclose(sample.scale, scale)
    assert sample.rotation == 0.0 and not sample.flipped and sample.image.shape == (64, 48, 3)
    labelled = sample.keypoints[[0, 2], :2]
    np.testing.assert_allclose(labelled, transform_points(kpts[[0, 2], :2], sample.matrix), atol=1e-4)
    np.testing.assert_array_equal(sample.keypoints[1], [0, 0, 0])
    np.testing.assert_allclose(crop_points_to_image(labelled, sample.center, sample.scale, (48, 64)),
                               kpts[[0, 2], :2], atol=1e-4)
    train = TopDownAffine(input_size=(64, 48), train=True, flip_index=[0, 1, 2], upper_body_ids=[0])
    a = train(image, kpts, [30, 20, 60, 80], np.random.default_rng(5))
    b = train(image, kpts, [30, 20, 60, 80], np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)


def test_augmentation_ranges() -> None:
    """Scale within 1 +- 0.25 of the box region, rotation within +-45 and 0 about half the time."""
    image = np.zeros((100, 100, 3), np.uint8)
    kpts = np.zeros((3, 3))
    transform = TopDownAffine(input_size=(64, 48), train=True, flip_index=[0, 1, 2])
    _, base = box_xywh_to_center_scale([20, 20, 40, 60], 0.75)
    ratios, rotations = [], []
    for seed in range(200):
        s = transform(image, kpts, [20, 20, 40, 60], np.random.default_rng(seed))
        ratios.append(s.scale[0] / base[0])
        rotations.append(s.rotation)
    assert 0.75 <= min(ratios) and max(ratios) <= 1.25 and max(ratios) - min(ratios) > 0.4
    rotations = np.array(rotations)
    assert np.abs(rotations).max() <= 45 and 0.35 < (rotations == 0).mean() < 0.65


def test_half_body() -> None:
    rng = np.random.default_rng(0)
    kpts = np.zeros((17, 3))
    kpts[:, :2] = rng.uniform(0, 200, (17, 2))
    kpts[:, 2] = 2
    upper = half_body_center_scale(kpts, COCO_UPPER_BODY_IDS, np.random.default_rng(1), upper_prob=1.0)
    np.testing.assert_allclose(upper[0], kpts[:11, :2].mean(axis=0))
    lower = half_body_center_scale(kpts, COCO_UPPER_BODY_IDS, np.random.default_rng(1), upper_prob=0.0)
    np.testing.assert_allclose(lower[0], kpts[11:, :2].mean(axis=0))
    w, h = kpts[11:, :2].max(0) - kpts[11:, :2].min(0)
    assert lower[1][0] == pytest.approx(1.5 * max(w, 0.75 * h))
    kpts[:, 2] = 0
    kpts[0, 2] = 2
    assert half_body_center_scale(kpts, COCO_UPPER_BODY_IDS, np.random.default_rng(1)) is None


def test_bad_input_errors_name_the_record() -> None:
    where = "annotation 183126 in person_keypoints_val2017.json"
    with pytest.raises(ValueError, match=r"annotation 183126 in person_keypoints_val2017.json: keypoints has 50 "
                                         r"values, expected 51"):
        validate_keypoints([0.0] * 50, 17, where)
    bad = [0.0] * 51
    bad[3 * 4 + 2] = 3
    with pytest.raises(ValueError, match=r"183126.*keypoint 4 has visibility 3, expected 0"):
        validate_keypoints(bad, 17, where)
    with pytest.raises(ValueError, match=r"183126.*flat list of numbers"):
        validate_keypoints([[1, 2, 2]] * 17, 17, where)
    nan = [1.0, 2.0, 2] * 17
    nan[0] = math.nan
    with pytest.raises(ValueError, match=r"keypoint 0 is labelled \(v=2\) but has a non-finite position"):
        validate_keypoints(nan, 17, where)
    assert validate_keypoints([1, 2, 2] * 17, 17, where).shape == (17, 3)
    with pytest.raises(ValueError, match=r"183126.*bbox \[10, 10, 0, 20\] has zero or negative size"):
        validate_box_xywh([10, 10, 0, 20], where)
    with pytest.raises(ValueError, match=r"183126.*bbox must be 4 numbers"):
        validate_box_xywh([10, 10, 20], where)
    with pytest.raises(ValueError, match=r"image 7 person 2: bbox \[0, 0, 5, 0\] has zero"):
        TopDownAffine()(np.zeros((10, 10, 3), np.uint8), np.zeros((17, 3)), [0, 0, 5, 0], where="image 7 person 2")
