"""The face family's augmentation presets: each op's effect on a seeded image, evaluation never augmented, the folder
config's defaults through the real CLI (issue 24)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from layouts import write_face_dataset, write_recordio_faces
from PIL import Image

from datamodules.faces.folders import IdentityFolderDataModule
from datamodules.faces.recordio import RecordIOFaceDataModule
from datamodules.faces.samples import (
    CROP_RATIO,
    CROP_SCALE,
    ERASE_FILL,
    ERASE_P,
    ERASE_RATIO,
    ERASE_SCALE,
    GRAY_P,
    JITTER,
    JITTER_P,
    TorchSeeded,
    face_transform,
    small_set_augmentations,
)
from datamodules.faces.tfrecord import TFRecordIdentityDataModule
from datamodules.images import decode_image
from datamodules.synthetic.identities import SyntheticFacesDataModule, render_identity
from lit_tasks.cli import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S = 112


def op(name: str) -> A.BasicTransform:
    """The small-set preset's op ``name``, always applied (its own probability is tested on the whole pipeline)."""
    found = [copy.deepcopy(t) for t in small_set_augmentations(S) if type(t).__name__ == name]
    assert len(found) == 1, name
    found[0].p = 1.0
    return found[0]


def draw(transform: A.BasicTransform, image: np.ndarray, seed: int) -> np.ndarray:
    return A.Compose([transform], seed=seed)(image=image)["image"]


# -- each op of the small-set preset on a seeded image -------------------------------------------------------------
def test_random_resized_crop_keeps_80_to_100_percent_of_the_face_within_the_aspect_range() -> None:
    """A coordinate image (red = x, green = y) shows the crop box each output was resized from."""
    h, w = 180, 200
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    areas = []
    for seed in range(40):
        out = draw(op("RandomResizedCrop"), image, seed).astype(np.float64)
        assert out.shape == (S, S, 3)
        # Bilinear resize: output pixel j samples x0 + (j + 0.5) * cw / S - 0.5, so the first-to-last spread is
        # (S - 1) / S of the crop width.
        cw = (out[:, -1, 0].mean() - out[:, 0, 0].mean()) * S / (S - 1)
        ch = (out[-1, :, 1].mean() - out[0, :, 1].mean()) * S / (S - 1)
        area = cw * ch / (w * h)
        assert CROP_SCALE[0] - 0.02 <= area <= CROP_SCALE[1] + 0.02, (seed, area)
        assert CROP_RATIO[0] - 0.02 <= cw / ch <= CROP_RATIO[1] + 0.02, (seed, cw / ch)
        assert -1 <= out[:, 0, 0].mean() and out[:, -1, 0].mean() <= w  # inside the image
        areas.append(area)
    assert min(areas) < 0.85 and np.std(areas) > 0.03  # the geometry really varies


def test_colour_jitter_scales_brightness_and_contrast_within_the_stated_factors() -> None:
    """On a grey texture (saturation has no effect) that no factor clips: mean x b, spread x b c, b, c in 1 +- 0.5."""
    rng = np.random.default_rng(0)
    grey = rng.integers(90, 131, (S, S, 1)).astype(np.uint8)
    image = np.repeat(grey, 3, axis=-1)
    source = image[..., 0].astype(np.float64)
    jitter, means = op("ColorJitter"), []
    assert jitter.hue == (0.0, 0.0)  # skin tone is identity: hue never moves
    for seed in range(40):
        out = draw(jitter, image, seed).astype(np.float64)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        mean_ratio = out.mean() / source.mean()
        std_ratio = out[..., 0].std() / source.std()
        assert 1 - JITTER - 0.01 <= mean_ratio <= 1 + JITTER + 0.01, (seed, mean_ratio)
        assert (1 - JITTER) ** 2 - 0.02 <= std_ratio <= (1 + JITTER) ** 2 + 0.02, (seed, std_ratio)
        # An increasing affine map of the intensities: geometry and ordering untouched.
        assert np.corrcoef(out[..., 0].ravel(), source.ravel())[0, 1] > 0.99
        means.append(mean_ratio)
    assert np.ptp(means) > 0.3


def test_to_gray_gives_equal_channels_of_the_luma() -> None:
    image = np.random.default_rng(1).integers(0, 256, (S, S, 3)).astype(np.uint8)
    out = draw(op("ToGray"), image, 0).astype(np.float64)
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0] - luma).max() <= 1.0


def test_erasing_blanks_one_grey_rectangle_of_the_stated_area_and_aspect() -> None:
    image = np.random.default_rng(2).integers(0, 100, (S, S, 3)).astype(np.uint8)  # never the fill value
    areas = []
    for seed in range(40):
        out = draw(op("Erasing"), image, seed)
        changed = (out != image).any(axis=-1)
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        eh, ew = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed.sum() == eh * ew, seed  # one solid rectangle
        assert (out[changed] == ERASE_FILL).all() and (out[~changed] == image[~changed]).all()
        area = eh * ew / S**2
        # Integer sides: allow a pixel either way on each side.
        assert ERASE_SCALE[0] * S**2 <= (eh + 1) * (ew + 1) and (eh - 1) * (ew - 1) <= ERASE_SCALE[1] * S**2, seed
        assert ERASE_RATIO[0] <= (ew + 1) / max(eh - 1, 1) and (ew - 1) / (eh + 1) <= ERASE_RATIO[1], seed
        areas.append(area)
    assert min(areas) < 0.1 < max(areas)


def test_each_op_of_the_small_set_preset_fires_with_its_probability_independently() -> None:
    """As ``face_transform`` draws them (:class:`TorchSeeded`): every op at its rate, and no two ops tied together."""
    image = np.random.default_rng(3).integers(0, 256, (S, S, 3)).astype(np.uint8)
    pipeline = TorchSeeded(A.Compose(small_set_augmentations(S), save_applied_params=True))
    draws = 600
    fired = []
    for _ in range(draws):
        fired.append({name for name, _params in pipeline(image=image)["applied_transforms"]})
    expected = {"RandomResizedCrop": 1.0, "HorizontalFlip": 0.5, "ColorJitter": JITTER_P, "ToGray": GRAY_P,
                "Erasing": ERASE_P}
    assert set().union(*fired) == set(expected)

    def near(count: int, p: float) -> bool:
        return abs(count / draws - p) < 4 * np.sqrt(p * (1 - p) / draws) + 1e-9

    for name, p in expected.items():
        assert near(sum(name in f for f in fired), p), name
    # albumentations' Compose(seed=...) seeds every op alike: flips and erasures (both p = 0.5) would coincide.
    for a, b in [("HorizontalFlip", "Erasing"), ("ColorJitter", "ToGray"), ("HorizontalFlip", "ToGray")]:
        assert near(sum(a in f and b in f for f in fired), expected[a] * expected[b]), (a, b)


def test_augmentations_follow_torchs_generator() -> None:
    """``seed_everything`` fixes them and an exact resume (which restores torch's state) replays them."""
    image = np.random.default_rng(7).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    transform = face_transform(32, "small_set")
    torch.manual_seed(3)
    first = [transform(image=image)["image"] for _ in range(4)]
    torch.manual_seed(3)
    again = [face_transform(32, "small_set")(image=image)["image"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_small_set_preset_gives_the_network_input_for_any_photo_size() -> None:
    transform = face_transform(32, "small_set")
    for shape in [(120, 90, 3), (40, 41, 3), (32, 32, 3)]:
        out = transform(image=np.random.default_rng(4).integers(0, 256, shape).astype(np.uint8))["image"]
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_flip_preset_only_ever_flips() -> None:
    image = np.random.default_rng(5).integers(0, 256, (S, S, 3)).astype(np.uint8)
    plain = face_transform(S, "none")(image=image)["image"]
    transform, flipped = face_transform(S, "flip"), 0
    for _ in range(100):
        out = transform(image=image)["image"]
        if torch.equal(out, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, plain)
    assert 25 < flipped < 75
    assert face_transform(S, True)(image=image)["image"].shape == plain.shape  # True is "flip"


def test_unknown_preset_is_refused_naming_the_datamodule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IdentityFolderDataModule: augment must be .*small_set.*got 'strong'"):
        IdentityFolderDataModule(root=str(tmp_path), augment="strong")


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, transform) -> None:
        self.transform = transform
        self.image = np.random.default_rng(6).integers(0, 256, (48, 48, 3)).astype(np.uint8)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(image=self.image)["image"]


def test_workers_draw_their_own_augmentations_and_the_seed_fixes_them() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(_Repeat(face_transform(32, "small_set")), batch_size=1, num_workers=2)
        return torch.cat(list(loader))

    first = run()
    # Worker 0 makes samples 0, 2, ...; worker 1 samples 1, 3, ...: from one inherited state they would be equal.
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first, run())


# -- evaluation never augments -------------------------------------------------------------------------------------
def write_identity_folder(root: Path, identities: int = 20, per_identity: int = 4, size: int = 40) -> Path:
    """``root/idNNN/k.png``: synthetic faces, as a user's folder of identities."""
    for identity in range(identities):
        folder = root / f"id{identity:03d}"
        folder.mkdir(parents=True)
        for k in range(per_identity):
            Image.fromarray(render_identity(identity, k, seed=1, image_size=size)).save(folder / f"{k}.png")
    return root


def items(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def evaluation_splits(make) -> None:
    """val / test / predict of ``make(augment="small_set")`` equal ``make(augment="none")``'s, call after call."""
    augmented, plain = make(augment="small_set"), make(augment="none")
    for dm in (augmented, plain):
        dm.setup("fit")
        dm.setup("predict")
    for split in ("val", "test", "predict"):
        first = items(augmented.dataset(split))
        assert first, split
        assert_same(first, items(plain.dataset(split)))
        assert_same(first, items(augmented.dataset(split)))
    # ... while training really is augmented.
    (image, label), (plain_image, plain_label) = first_training_sample(augmented), first_training_sample(plain)
    assert label == plain_label and image.shape == plain_image.shape and not torch.equal(image, plain_image)


def first_training_sample(dm) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = dm.dataset("train")
    return next(iter(dataset)) if isinstance(dataset, torch.utils.data.IterableDataset) else dataset[0]


def test_folder_evaluation_is_the_deterministic_transform_whatever_the_preset(tmp_path: Path) -> None:
    root = write_identity_folder(tmp_path / "faces")
    make = lambda **kw: IdentityFolderDataModule(root=str(root), num_val_pairs=10, image_size=32,  # noqa: E731
                                                 num_workers=0, **kw)
    evaluation_splits(make)
    dm = make(augment="small_set")
    dm.setup("fit")
    plain = face_transform(32, "none")
    for pair, (a, b, _) in zip(items(dm.dataset("val")), dm.verification_pairs()):
        assert torch.equal(pair["image_a"], plain(image=decode_image(a))["image"])
        assert torch.equal(pair["image_b"], plain(image=decode_image(b))["image"])


def test_tfrecord_evaluation_is_not_augmented(tmp_path: Path) -> None:
    faces = write_face_dataset(tmp_path)
    evaluation_splits(lambda **kw: TFRecordIdentityDataModule(
        train_files=faces["train_files"], label_map=faces["label_map"], pairs=faces["pairs"], image_size=16,
        num_workers=0, batch_size=2, **kw))


def test_recordio_and_bin_evaluation_is_not_augmented(tmp_path: Path) -> None:
    rec = write_recordio_faces(tmp_path / "pack")
    evaluation_splits(lambda **kw: RecordIOFaceDataModule(rec=str(rec), val_bins=["lfw.bin"], image_size=24,
                                                          num_workers=0, **kw))


def test_synthetic_evaluation_is_the_rendered_face_unaugmented() -> None:
    make = lambda **kw: SyntheticFacesDataModule(num_train_identities=4, samples_per_identity=2,  # noqa: E731
                                                 num_val_identities=4, val_samples_per_identity=2, num_val_pairs=8,
                                                 image_size=32, num_workers=0, **kw)
    evaluation_splits(make)
    dm = make(augment="small_set")
    dm.setup("fit")
    pair, plain = dm.dataset("val")[0], face_transform(32, "none")
    ia, sa, ib, sb, _ = (int(x) for x in dm.dataset("val").pairs[0])
    assert torch.equal(pair["image_a"], plain(image=render_identity(ia, sa, 0, 32))["image"])
    assert torch.equal(pair["image_b"], plain(image=render_identity(ib, sb, 0, 32))["image"])


# -- the folder config's defaults through the real CLI -------------------------------------------------------------
def test_arcface_folder_config_trains_on_a_folder_of_identities_with_its_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pairs file: the config holds out 10% of the identities; its preset, warm-up and stride are what runs."""
    root = write_identity_folder(tmp_path / "faces")
    monkeypatch.setattr(sys, "argv", ["lit-tasks"])
    cli = run_cli([
        "fit", f"--config={CONFIGS / 'face/arcface_folder.yaml'}",
        # sizes only: a tiny network, 32-px faces, small batches, few pairs, two epochs
        f"--data.init_args.root={root}", "--data.init_args.image_size=32", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0", "--data.init_args.num_val_pairs=20",
        "--model.init_args.backbone=test_resnet", "--model.init_args.embedding_size=16",
        "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    assert cli.config["fit"]["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    assert cli.trainer.state.finished and cli.trainer.loggers
    data, task = cli.datamodule, cli.model
    assert data.hparams["augment"] == "small_set"
    assert "RandomResizedCrop" in repr(data.train_set.transform) and "Erasing" in repr(data.train_set.transform)
    assert data.num_identities == 18  # 2 of 20 held out for verification
    assert {p[0].parent.name for p in data.verification_pairs()}.isdisjoint(data.class_names)
    # The warm-up is a tenth of the run however small the folder: 72 images / 4 = 18 steps an epoch, 36 steps.
    assert task.hparams.warmup_fraction == 0.1 and task.hparams.warmup_steps == 0
    assert task.total_steps() == 36 and task.warmup_steps() == 4
    assert task.hparams.output_stride == 32
    assert 0.0 <= float(cli.trainer.callback_metrics["val/verification_accuracy"]) <= 1.0
