"""Face data: synthetic identities, identity folders, LFW / CSV pairs and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.faces.folders import IdentityFolderDataModule, scan_identity_folders
from datamodules.faces.samples import parse_pairs
from datamodules.synthetic.identities import (
    SyntheticFacesDataModule,
    identity_params,
    make_pairs,
    render_identity,
)


# -- synthetic identities ------------------------------------------------------------------------
def test_rendering_is_deterministic_and_varies_per_sample() -> None:
    a = render_identity(3, 0, seed=0, image_size=48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_identity(3, 0, seed=0, image_size=48))
    assert not np.array_equal(a, render_identity(3, 1, seed=0, image_size=48))
    assert not np.array_equal(a, render_identity(3, 0, seed=1, image_size=48))


def test_identity_appearance_is_fixed_and_distinct() -> None:
    assert identity_params(1)["eye_dx"] == identity_params(1)["eye_dx"]
    assert identity_params(1)["eye_dx"] != identity_params(2)["eye_dx"]
    assert identity_params(1, seed=0)["mouth_w"] != identity_params(1, seed=1)["mouth_w"]


def test_pairs_are_balanced_and_well_formed() -> None:
    ids = np.arange(50, 60)
    pairs = make_pairs(ids, samples_per_identity=5, num_pairs=40, seed=0)
    assert pairs.shape == (40, 5) and pairs[:, 4].tolist() == [1, 0] * 20
    same, diff = pairs[pairs[:, 4] == 1], pairs[pairs[:, 4] == 0]
    assert (same[:, 0] == same[:, 2]).all() and (same[:, 1] != same[:, 3]).all()
    assert (diff[:, 0] != diff[:, 2]).all()
    assert set(pairs[:, [0, 2]].ravel()) <= set(ids.tolist())
    with pytest.raises(ValueError, match="at least 2 identities"):
        make_pairs(np.array([1]), 5, 4)


def test_synthetic_datamodule_batches_and_disjoint_identities() -> None:
    dm = SyntheticFacesDataModule(num_train_identities=8, samples_per_identity=3, num_val_identities=4,
                                  val_samples_per_identity=3, num_val_pairs=20, image_size=32, batch_size=4,
                                  num_workers=0)
    assert dm.num_identities == 8
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and labels.dtype == torch.int64
    batch = next(iter(dm.val_dataloader()))
    assert batch["image_a"].shape == (4, 3, 32, 32) and batch["same"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2, 3]
    val_ids = {int(n[2:]) for p in dm.val_set for n in (p["identity_a"], p["identity_b"])}
    assert val_ids.isdisjoint(range(8))  # open-set: no training identity in the pairs
    assert len(dm.predict_set) == 12 and dm.predict_set[0]["name"] == "id00008/000"
    with pytest.raises(ValueError, match="at least 2 identities"):
        SyntheticFacesDataModule(num_train_identities=1)


# -- identity folders and pairs --------------------------------------------------------------------
def _image(path, size=(20, 24), mode="RGB", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture()
def face_tree(tmp_path):
    root = tmp_path / "faces"
    _image(root / "alice" / "alice_0001.jpg", value=10)
    _image(root / "alice" / "alice_0002.png", value=20)
    _image(root / "bob" / "bob_0001.pgm", mode="L", value=30)  # greyscale
    _image(root / "bob" / "bob_0002.png", value=40)
    _image(root / "carol" / "carol_0001.png", value=50)
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "x.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("a file at the top level is not an identity")
    return root


def test_scan_skips_folders_without_readable_images_with_a_warning(face_tree) -> None:
    with pytest.warns(UserWarning) as record:
        names, files = scan_identity_folders(face_tree)
    messages = " ".join(str(w.message) for w in record)
    assert "broken has no readable image" in messages and "empty has no readable image" in messages
    assert names == ["alice", "bob", "carol"]
    assert [len(f) for f in files] == [2, 2, 1]


def test_lfw_pairs_three_and_four_field_lines(face_tree) -> None:
    pairs_file = face_tree / "pairs.txt"
    pairs_file.write_text("1\t2\nalice\t1\t2\nbob 1 2\nalice\t1\tbob\t2\n\ncarol 1 alice 2\n")
    pairs = parse_pairs(pairs_file)
    assert [(a.name, b.name, s) for a, b, s in pairs] == [
        ("alice_0001.jpg", "alice_0002.png", True),
        ("bob_0001.pgm", "bob_0002.png", True),
        ("alice_0001.jpg", "bob_0002.png", False),
        ("carol_0001.png", "alice_0002.png", False),
    ]


def test_pairs_errors_name_the_line(face_tree) -> None:
    missing = face_tree / "pairs.txt"
    missing.write_text("alice 1 2\nbob 1 3\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.txt line 2: image .*bob_0003\.\* not found"):
        parse_pairs(missing)
    malformed = face_tree / "bad.txt"
    malformed.write_text("alice 1 2\nalice 1 bob 2 extra\n")
    with pytest.raises(ValueError, match="bad.txt line 2: expected 3 fields"):
        parse_pairs(malformed)
    csv_file = face_tree / "pairs.csv"
    csv_file.write_text("path_a,path_b,same\nalice/alice_0001.jpg,bob/bob_0009.png,0\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.csv line 2: image .*bob_0009.png not found"):
        parse_pairs(csv_file)
    csv_file.write_text("alice/alice_0001.jpg,bob/bob_0002.png,1\nalice/alice_0001.jpg,bob/bob_0002.png,maybe\n")
    with pytest.raises(ValueError, match="pairs.csv line 2: 'same' must be 1/0/true/false, got 'maybe'"):
        parse_pairs(csv_file)


def test_csv_pairs_with_header(face_tree) -> None:
    csv_file = face_tree / "pairs.csv"
    csv_file.write_text("path_a,path_b,same\nalice/alice_0001.jpg,alice/alice_0002.png,1\n"
                        "alice/alice_0001.jpg,carol/carol_0001.png,false\n")
    pairs = parse_pairs(csv_file)
    assert [(a.parent.name, b.parent.name, s) for a, b, s in pairs] == [("alice", "alice", True), ("alice", "carol", False)]


def test_folder_datamodule_with_pairs_file(face_tree) -> None:
    (face_tree / "pairs.txt").write_text("alice 1 2\nalice 1 bob 2\n")
    with pytest.warns(UserWarning):
        dm = IdentityFolderDataModule(str(face_tree), pairs=str(face_tree / "pairs.txt"), image_size=16,
                                      batch_size=2, num_workers=0)
        assert dm.num_identities == 3 and dm.class_names == ["alice", "bob", "carol"]
        dm.setup("fit")
    images, labels = next(iter(dm.make_loader(dm.train_set, train=False)))
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 0]
    bob_grey = dm.train_set[2][0]  # the greyscale .pgm became 3 equal channels
    assert bob_grey.shape == (3, 16, 16) and torch.allclose(bob_grey, torch.full_like(bob_grey, 30 / 255))
    batch = next(iter(dm.val_dataloader()))
    assert batch["same"].tolist() == [True, False] and batch["identity_b"] == ["alice", "bob"]
    assert sorted(dm.predict_set[i]["name"] for i in range(len(dm.predict_set))) == [
        "alice/alice_0001.jpg", "alice/alice_0002.png", "bob/bob_0002.png"]


def test_folder_datamodule_holds_out_identities(tmp_path) -> None:
    for i in range(10):
        for j in range(3):
            _image(tmp_path / f"id{i}" / f"{j}.png", value=i * 20 + j)
    dm = IdentityFolderDataModule(str(tmp_path), val_fraction=0.3, num_val_pairs=10, image_size=8, num_workers=0)
    assert dm.num_identities == 7
    dm.setup("fit")
    val_names = {p[k].parent.name for p in dm.val_set.pairs for k in (0, 1)}
    assert len(val_names) <= 3 and val_names.isdisjoint(dm.class_names)


def test_fewer_than_two_identities_is_an_error(tmp_path) -> None:
    _image(tmp_path / "solo" / "a.png")
    with pytest.raises(ValueError, match="1 training identity .* at least 2"):
        IdentityFolderDataModule(str(tmp_path), pairs=None, val_fraction=0.0).num_identities
    _image(tmp_path / "duo" / "b.png")
    with pytest.raises(ValueError, match="no verification pairs; give `pairs` or a `val_fraction` > 0"):
        IdentityFolderDataModule(str(tmp_path), val_fraction=0.0).setup("fit")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        IdentityFolderDataModule(str(tmp_path / "nope")).num_identities


def test_unreadable_image_at_load_time_names_the_file(face_tree) -> None:
    (face_tree / "pairs.txt").write_text("alice 1 2\n")
    (face_tree / "carol" / "carol_0002.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        dm = IdentityFolderDataModule(str(face_tree), pairs=str(face_tree / "pairs.txt"), image_size=8, num_workers=0)
        dm.setup("fit")
    index = [str(p) for p, _ in dm.train_set.items].index(str(face_tree / "carol" / "carol_0002.png"))
    with pytest.raises(OSError, match="cannot read image .*carol_0002.png"):
        dm.train_set[index]
