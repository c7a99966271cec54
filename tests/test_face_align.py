"""5-point alignment: Umeyama against linear least squares and OpenCV, a face warped by a known transform and back, the transform, the CSV."""

from __future__ import annotations

import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import pytest

from datamodules.faces.align import (
    ARCFACE_TEMPLATE,
    FaceAlign,
    alignment_matrix,
    arcface_template,
    estimate_similarity,
    norm_crop,
    read_landmarks_csv,
    transform_points,
    warp_face,
)


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    return np.array([[c, -s, tx], [s, c, ty]])


def invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent closed form: the similarity [[a, -b, tx], [b, a, ty]] is linear in (a, b, tx, ty)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_is_insightfaces():
    t112 = arcface_template(112)
    assert t112.shape == (5, 2) and t112[0].tolist() == pytest.approx([38.2946, 51.6963], abs=1e-5)
    assert np.array_equal(arcface_template(224), (ARCFACE_TEMPLATE * np.float32(2.0)).astype(np.float64))
    t128 = arcface_template(128)  # the 112 face centred in a 128 crop: x shifted by 8
    assert np.allclose(t128[:, 0], t112[:, 0] + 8, atol=1e-5) and np.allclose(t128[:, 1], t112[:, 1], atol=1e-5)
    assert np.allclose(arcface_template(256), t128 * 2, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of 112 or 128"):
        arcface_template(100)


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_equals_linear_least_squares(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 500, (5, 2))
    dst = transform_points(src, similarity(rng.uniform(0.1, 3), rng.uniform(-180, 180), *rng.uniform(-100, 100, 2)))
    dst += rng.normal(0, 3.0, dst.shape)  # noisy: the fit is a compromise, not exact
    ours = estimate_similarity(src, dst)
    # float64, 5 points: rounding ~1e-13 relative to coordinates of ~500.
    assert np.allclose(ours, lstsq_similarity(src, dst), rtol=0, atol=1e-9)
    assert np.allclose(alignment_matrix(src), lstsq_similarity(src, arcface_template()), rtol=0, atol=1e-9)


def test_mirrored_landmarks_get_a_rotation_not_a_reflection():
    """A left-right mirrored face (det(A) < 0): the best proper similarity, as the lstsq parametrisation forces."""
    mirrored = arcface_template() * [-1.0, 1.0] + [200.0, 0.0]
    ours = estimate_similarity(mirrored, arcface_template())
    assert np.linalg.det(ours[:, :2]) > 0
    assert np.allclose(ours, lstsq_similarity(mirrored, arcface_template()), atol=1e-9)


def test_umeyama_equals_skimage_if_installed():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(11)
    src, dst = rng.uniform(0, 300, (5, 2)), arcface_template()
    reference = transform.SimilarityTransform()
    reference.estimate(src, dst)
    assert np.allclose(estimate_similarity(src, dst), reference.params[:2], atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_equals_opencv_estimate_affine_partial(seed):
    rng = np.random.default_rng(100 + seed)
    truth = similarity(rng.uniform(0.5, 2.5), rng.uniform(-40, 40), *rng.uniform(-20, 60, 2))
    landmarks = transform_points(arcface_template(), invert(truth)) + rng.normal(0, 0.3, (5, 2))
    ours = alignment_matrix(landmarks)
    theirs, inliers = cv2.estimateAffinePartial2D(landmarks, arcface_template(), method=cv2.LMEDS)
    assert inliers.ravel().tolist() == [1] * 5  # every point used: OpenCV's refined fit is the least-squares one
    # Levenberg-Marquardt on a residual linear in the 4 parameters converges to the closed form up to its stop
    # tolerance; entries are O(1) (rotation/scale) and O(100) (translation).
    assert np.allclose(ours[:, :2], theirs[:, :2], atol=1e-6) and np.allclose(ours[:, 2], theirs[:, 2], atol=1e-4)
    # Least squares: no other similarity (OpenCV's, the one the noise was added to) fits the points better.
    residual = lambda m: ((transform_points(landmarks, m) - arcface_template()) ** 2).sum()  # noqa: E731
    assert residual(ours) <= residual(theirs) + 1e-9 and residual(ours) < residual(invert(truth))


def _canonical_face(size: int = 112) -> np.ndarray:
    """A dark 112x112 'face' with a bright Gaussian blob (sigma 2 px) at each template landmark."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for x, y in arcface_template(size):
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
    return np.clip(image * 250, 0, 255).astype(np.uint8)


def _blob_centres(image: np.ndarray, near: np.ndarray, radius: int = 6) -> np.ndarray:
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float64)
    centres = []
    for x, y in near:
        window = ((xs - x) ** 2 + (ys - y) ** 2 <= radius**2) * image.astype(np.float64)
        centres.append([(window * xs).sum() / window.sum(), (window * ys).sum() / window.sum()])
    return np.array(centres)


def test_a_face_warped_by_a_known_similarity_is_mapped_back_onto_the_template():
    face = _canonical_face()
    assert np.abs(_blob_centres(face, arcface_template()) - arcface_template()).max() < 0.2  # the probe itself
    for scale, degrees, tx, ty in [(2.3, 17.0, 40.0, 10.0), (0.8, -35.0, 90.0, 150.0), (1.6, 180.0, 250.0, 230.0)]:
        to_photo = similarity(scale, degrees, tx, ty)
        photo = cv2.warpAffine(face, to_photo, (300, 280))
        landmarks = transform_points(arcface_template(), to_photo)
        matrix = alignment_matrix(landmarks)
        assert np.allclose(matrix, invert(to_photo), atol=1e-9)  # exact landmarks: the inverse, to rounding
        aligned = norm_crop(photo, landmarks)
        assert aligned.shape == (112, 112) and aligned.dtype == np.uint8
        error = np.abs(_blob_centres(aligned, arcface_template()) - arcface_template()).max()
        assert error < 0.5, (scale, degrees, error)


def test_warp_maps_pixels_forward_like_norm_crop():
    """cv2.warpAffine takes M as source -> crop: crop(u, v) = I(M^-1 (u, v)); on a linear ramp bilinear is exact."""
    ys, xs = np.mgrid[0:200, 0:240].astype(np.float32)
    ramp = np.stack([0.5 * xs + 0.25 * ys, 0.1 * xs + 0.8 * ys + 3, xs * 0 + 7], axis=-1).astype(np.float32)
    matrix = similarity(1.3, 25.0, -30.0, 12.0)
    crop = warp_face(ramp, matrix, 112)
    us, vs = np.mgrid[0:112, 0:112]
    source = transform_points(np.stack([vs.ravel(), us.ravel()], axis=1).astype(np.float64), invert(matrix))
    inside = (source[:, 0] >= 0) & (source[:, 0] <= 238) & (source[:, 1] >= 0) & (source[:, 1] <= 198)
    expected = np.stack([0.5 * source[:, 0] + 0.25 * source[:, 1], 0.1 * source[:, 0] + 0.8 * source[:, 1] + 3], axis=1)
    got = crop.reshape(-1, 3)[:, :2]
    # OpenCV rounds source coordinates to 1/32 px (INTER_TAB_SIZE) even for float images: an error of at most
    # (|slope x| + |slope y|) / 64 <= 0.9 / 64, plus float32 rounding of values below 300.
    assert inside.sum() > 5000 and np.abs(got[inside] - expected[inside]).max() < 0.9 / 64 + 1e-4
    assert np.all(crop.reshape(-1, 3)[~inside & ((source < -1).any(axis=1) | (source[:, 0] > 240) | (source[:, 1] > 200))] == 0)


def test_degenerate_landmarks_are_refused():
    with pytest.raises(ValueError, match=r"degenerate landmarks \(all at one point"):
        alignment_matrix(np.full((5, 2), 37.5))
    with pytest.raises(ValueError, match="not all finite"):
        alignment_matrix(np.array([[1, 2], [3, 4], [5, np.nan], [7, 8], [9, 10]], dtype=float))
    with pytest.raises(ValueError, match=r"expected \(5, 2\) landmarks"):
        alignment_matrix(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="differ in shape"):
        estimate_similarity(np.zeros((3, 2)), np.zeros((4, 2)))
    # Collinear but distinct points still determine a similarity (skimage's rank-1 case).
    line = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=float)
    assert np.allclose(estimate_similarity(line, line * 2 + 1), [[2, 0, 1], [0, 2, 1]], atol=1e-12)


def test_face_align_transform_in_a_compose():
    rng = np.random.default_rng(5)
    to_photo = similarity(1.9, 12.0, 30.0, 20.0)
    photo = rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)
    landmarks = transform_points(arcface_template(), to_photo)
    extra = np.array([[100.0, 120.0], [150.0, 90.0]])
    mask = (rng.random((260, 300)) > 0.5).astype(np.uint8)
    expected = norm_crop(photo, landmarks)

    with_keypoints = A.Compose([FaceAlign()], keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
    out = with_keypoints(image=photo, mask=mask, keypoints=np.vstack([landmarks, extra]))
    # albumentations keeps keypoints in float32: the matrix is the one of the float32-rounded landmarks.
    stored = landmarks.astype(np.float32)
    assert np.array_equal(out["image"], norm_crop(photo, stored))
    assert np.array_equal(out["mask"], cv2.warpAffine(mask, alignment_matrix(stored), (112, 112), flags=cv2.INTER_NEAREST))
    points = np.asarray(out["keypoints"], dtype=np.float64)
    # float32 outputs of size ~100: 1e-5 resolution.
    assert np.allclose(points[:5], arcface_template(), atol=1e-4)
    assert np.allclose(points[5:], transform_points(extra, alignment_matrix(landmarks)), atol=1e-4)

    with_key = A.Compose([FaceAlign(), A.HorizontalFlip(p=0.0)])
    out = with_key(image=photo, landmarks=landmarks)
    assert np.array_equal(out["image"], expected) and np.allclose(out["landmarks"], arcface_template(), atol=1e-9)

    larger = A.Compose([FaceAlign(image_size=224)])(image=photo, landmarks=landmarks)
    assert larger["image"].shape == (224, 224, 3) and np.allclose(larger["landmarks"], arcface_template(224), atol=1e-9)
    with pytest.raises(ValueError, match="FaceAlign needs 5 landmarks"):
        A.Compose([FaceAlign()])(image=photo)
    with pytest.raises(ValueError, match="multiples of 112 or 128"):
        FaceAlign(image_size=100)


def test_read_landmarks_csv(tmp_path):
    values = np.arange(10, dtype=float) + 0.5
    text = "path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n" + "a/1.jpg," + ",".join(map(str, values)) + "\n\n" \
        + "b/2.jpg," + ",".join(map(str, values * 2)) + "\n"
    (tmp_path / "lm.csv").write_text(text)
    table = read_landmarks_csv(tmp_path / "lm.csv")
    assert list(table) == ["a/1.jpg", "b/2.jpg"]
    assert np.array_equal(table["a/1.jpg"], values.reshape(5, 2))
    assert np.array_equal(table["a/1.jpg"][1], [2.5, 3.5])  # x2, y2
    planar = read_landmarks_csv(tmp_path / "lm.csv", layout="planar")
    assert np.array_equal(planar["a/1.jpg"][1], [1.5, 6.5])  # x2, y2 in x1..x5, y1..y5 order

    bad = {
        "short.csv": ("a.jpg,1,2,3\n", r"short.csv, line 1: expected an image path and 10 numbers, got 4 fields"),
        "word.csv": ("a.jpg," + ",".join(["1"] * 10) + "\nb.jpg,1,2,3,4,5,x,7,8,9,10\n",
                     r"word.csv, line 2: landmarks .* are not all numbers"),
        "nan.csv": ("a.jpg,1,2,3,4,5,nan,7,8,9,10\n", r"nan.csv, line 1: landmarks .* are not all finite"),
        "twice.csv": ("a.jpg," + ",".join(["1"] * 10) + "\na.jpg," + ",".join(["2"] * 10) + "\n",
                      r"twice.csv, line 2: a.jpg already has landmarks on line 1"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            read_landmarks_csv(tmp_path / name)
    with pytest.raises(ValueError, match="layout"):
        read_landmarks_csv(tmp_path / "lm.csv", layout="xy")
