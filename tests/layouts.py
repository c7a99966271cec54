"""Tiny datasets written in the on-disk layouts the configs' comments and the README describe (shared by test files)."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.recordio import IRHeader, pack_record, write_recordio
from lit_tasks.callbacks.segmentation_images import class_palette

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_tfrecords.py"

# Segmentation: (stem, (h, w), image format, mask mode) per split: JPEG and PNG images, grey and palette masks.
IGNORE = 255
CLASSES = ["sky", "road", "car"]
MASK_FILES = {
    "train": [("a", (9, 12), "jpg", "L"), ("b", (12, 7), "png", "P"), ("c", (10, 10), "png", "L"),
              ("d", (8, 11), "jpg", "P")],
    "val": [("e", (11, 9), "png", "P"), ("f", (7, 13), "jpg", "L"), ("g", (12, 12), "png", "L")],
}
# Faces: identity -> image extensions (JPEG and PNG, colour and greyscale, of different sizes) and LFW-style pairs.
FACE_LAYOUT = {"alice": [".jpg", ".png", ".png"], "bob": [".png", ".jpg"], "carol": [".png", ".png"]}
FACE_PAIRS = "alice 1 2\nalice 1 bob 2\nbob 1 2\ncarol 1 alice 3\n"


def make_tfrecords(*argv: str) -> list[str]:
    """``python tools/make_tfrecords.py ARGV --no-progress``, run in-process; returns the shard paths."""
    spec = importlib.util.spec_from_file_location("make_tfrecords", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([*argv, "--no-progress"])


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    """``array`` (H, W, 3) uint8 encoded as JPEG."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_coco_tfrecords(coco_root: Path, out: Path) -> dict:
    """Shards of a COCO layout's train2017 (plain, 3 shards) and val2017 (gzip) with the train label map."""
    for split, compression in (("train2017", "none"), ("val2017", "gzip")):
        make_tfrecords("coco", "--images", str(coco_root / split),
                       "--annotations", str(coco_root / "annotations" / f"instances_{split}.json"),
                       "--out", str(out / split), "--num-shards", "3", "--compression", compression)
    return {"root": coco_root, "train_files": str(out / "train2017-*.tfrecord"),
            "val_files": str(out / "val2017-*.tfrecord.gz"), "label_map": str(out / "train2017.label_map.pbtxt")}


def save_mask(ids: np.ndarray, path: Path, mode: str) -> None:
    """Class ids as a grey (``"L"``) or palette (``"P"``) PNG."""
    image = Image.fromarray(ids.astype(np.uint8))
    if mode == "P":  # a palette PNG whose colours differ from the indices, as VOC ships them
        image = image.convert("P")
        image.putpalette(np.random.default_rng(1).integers(0, 256, 768).tolist())
    image.save(path)


def write_mask_dataset(tmp_path: Path) -> dict:
    """``seg/images/{train,val}``, ``seg/masks/{train,val}``, ``seg/classes.yaml`` and their TFRecord shards."""
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    for split, files in MASK_FILES.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for stem, (h, w), fmt, mode in files:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{stem}.{fmt}")
            ids = rng.integers(0, len(CLASSES), (h, w))
            ids[0, : w // 2] = IGNORE  # unlabelled pixels travel too
            save_mask(ids, root / "masks" / split / f"{stem}.png", mode)
    (root / "classes.yaml").write_text("".join(f"- {name}\n" for name in CLASSES))
    out = tmp_path / "tfr"
    for split, shards, compression in (("train", "2", "gzip"), ("val", "1", "none")):
        make_tfrecords("masks", "--images", str(root / "images" / split), "--masks", str(root / "masks" / split),
                       "--out", str(out / split), "--num-shards", shards, "--compression", compression)
    return {"root": root, "classes": str(root / "classes.yaml"), "train_files": str(out / "train-*.tfrecord.gz"),
            "val_files": str(out / "val-*.tfrecord")}


def write_voc(root: Path) -> None:
    """PASCAL VOC2012 layout: 4 JPEGs, palette masks of 21 classes, ImageSets/Segmentation/{train,val}.txt."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        mask = rng.integers(0, 21, size=(40, 48), dtype=np.uint8)
        im = Image.frombytes("P", (48, 40), mask.tobytes())
        im.putpalette(sum(class_palette(256), ()))
        im.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("0\n1\n2\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("3\n")


def write_face_dataset(tmp_path: Path) -> dict:
    """``faces/<identity>/<identity>_000k.ext`` with ``faces/pairs.txt`` (LFW format), and its gzip shards."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for name, extensions in FACE_LAYOUT.items():
        (root / name).mkdir(parents=True)
        for k, ext in enumerate(extensions, start=1):
            shape = (18 + k, 20 - k) if (name, k) == ("carol", 2) else (18 + k, 20 - k, 3)  # carol 2 is greyscale
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{name}_{k:04d}{ext}")
    (root / "pairs.txt").write_text(FACE_PAIRS)
    out = tmp_path / "tfr" / "faces"
    make_tfrecords("folder", "--root", str(root), "--out", str(out), "--num-shards", "2", "--compression", "gzip")
    return {"root": root, "pairs": str(root / "pairs.txt"), "train_files": f"{out}-*.tfrecord.gz",
            "label_map": f"{out}.label_map.pbtxt"}


def write_recordio_faces(root: Path, bins: tuple[str, ...] = ("lfw.bin",), identities: int = 4, per_identity: int = 2,
                         pairs: int = 6, size: int = 24) -> Path:
    """An insightface pack (MS1M layout) ``root/train.rec`` + ``.idx`` and verification ``.bin`` sets beside it.

    Keys ``1..N`` are images (flag 0, label = identity), then one identity record per identity (label = its image
    keys ``[start, end)``), and record 0 the header (label = ``[first identity key, one past the last]``). A
    ``.bin`` is insightface's pickle ``(list of JPEG bytes, list of issame)``, two images per pair.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    face = lambda: jpeg_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # noqa: E731
    num_images = identities * per_identity
    records = [(key, pack_record(IRHeader(0, float((key - 1) // per_identity), key, 0), face()))
               for key in range(1, num_images + 1)]
    first = num_images + 1
    records += [(first + i, pack_record(IRHeader(0, [1.0 + i * per_identity, 1.0 + (i + 1) * per_identity],
                                                 first + i, 0))) for i in range(identities)]
    records.append((0, pack_record(IRHeader(0, [float(first), float(first + identities)], 0, 1))))
    write_recordio(root / "train.rec", records)
    for name in bins:
        images = [face() for _ in range(2 * pairs)]
        (root / name).write_bytes(pickle.dumps((images, [k % 2 == 0 for k in range(pairs)]), protocol=4))
    return root / "train.rec"


THUMOS_CLASSES = ["Background", "BaseballPitch", "CliffDiving", "Ambiguous"]
THUMOS_SESSIONS = {"train": ["video_validation_0000001", "video_validation_0000002", "video_validation_0000003"],
                   "test": ["video_test_0000001"]}


def write_thumos_features(root: Path, rgb_dim: int = 6, flow_dim: int = 4, frames: int = 24) -> Path:
    """THUMOS'14-style features in both published layouts, the same arrays in each, under ``root``:

    LSTR / TeSTra: ``data_info.json`` (``{"THUMOS": {class_names, num_classes, ignore_index, *_session_set}}``),
    ``rgb_kinetics_resnet50/<session>.npy``, ``flow_kinetics_bninception/<session>.npy`` and
    ``target_perframe/<session>.npy`` (one-hot float64 rows); OadTR: ``data_info_new.json`` (``class_index`` = the
    names), ``thumos_{val,test}_anno.pickle`` (``{session: {"anno", "feature_length"}}``) and
    ``thumos_all_feature_{val,test}_tsn_v2.pickle`` (``{session: {"rgb", "flow"}}``); "train" is THUMOS's val set.
    """
    rng = np.random.default_rng(0)
    num_classes = len(THUMOS_CLASSES)
    for folder in ("rgb_kinetics_resnet50", "flow_kinetics_bninception", "target_perframe"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    sets = {"train_session_set": THUMOS_SESSIONS["train"], "test_session_set": THUMOS_SESSIONS["test"]}
    (root / "data_info.json").write_text(json.dumps({"THUMOS": {
        "class_names": THUMOS_CLASSES, "num_classes": num_classes, "ignore_index": num_classes - 1, **sets}}))
    (root / "data_info_new.json").write_text(json.dumps({"THUMOS": {"class_index": THUMOS_CLASSES, **sets}}))
    for split, tag in (("train", "val"), ("test", "test")):
        features, annos = {}, {}
        for name in THUMOS_SESSIONS[split]:
            labels = np.repeat(rng.permutation(num_classes), frames // num_classes)  # every class in every session
            anno = np.eye(num_classes)[labels]
            rgb = rng.standard_normal((len(labels), rgb_dim)).astype(np.float32)
            flow = rng.standard_normal((len(labels), flow_dim)).astype(np.float32)
            for folder, array in (("rgb_kinetics_resnet50", rgb), ("flow_kinetics_bninception", flow),
                                  ("target_perframe", anno)):
                np.save(root / folder / f"{name}.npy", array)
            features[name], annos[name] = {"rgb": rgb, "flow": flow}, {"anno": anno, "feature_length": len(labels)}
        (root / f"thumos_all_feature_{tag}_tsn_v2.pickle").write_bytes(pickle.dumps(features, protocol=4))
        (root / f"thumos_{tag}_anno.pickle").write_bytes(pickle.dumps(annos, protocol=4))
    return root
