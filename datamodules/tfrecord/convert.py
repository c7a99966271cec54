"""Datasets on disk -> sharded TFRecords in the TF Object Detection API layout (``tools/make_tfrecords.py``).

Keys follow TensorFlow's conventions so shards read in TensorFlow and TensorFlow's shards read here:
``image/encoded`` (the original file bytes, not re-encoded), ``image/format``, ``image/height``,
``image/width``, ``image/filename``, ``image/source_id``; detection adds ``image/object/bbox/xmin|ymin|
xmax|ymax`` normalised to [0, 1] by the image size, ``image/object/class/label`` (label-map ids, e.g. COCO
category ids, as the OD API does), ``image/object/class/text`` and ``image/object/is_crowd``; classification
/ identity adds ``image/class/label`` and ``image/class/text``; segmentation adds
``image/segmentation/class/encoded`` (a PNG of class indices) and ``image/segmentation/class/format``.
Records are dealt round-robin over ``{out}-00000-of-000NN.tfrecord`` shards (as the OD API's
``open_sharded_output_tfrecords``), each with its index file.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from contextlib import ExitStack
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import example_pb2
from .compression import normalize_compression
from .features import build_example, bytes_feature, float_feature, int64_feature
from .writer import TFRecordWriter

_SUFFIX = {None: "", "gzip": ".gz", "zlib": ".zlib"}


def shard_paths(out: str, num_shards: int, compression: str | None = None) -> list[str]:
    """``{out}-00000-of-00016.tfrecord`` (``.gz`` / ``.zlib`` when compressed) for each shard."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    suffix = ".tfrecord" + _SUFFIX[normalize_compression(compression)]
    return [f"{out}-{i:05d}-of-{num_shards:05d}{suffix}" for i in range(num_shards)]


def write_sharded(
    examples: Iterable[example_pb2.Example],
    out: str,
    num_shards: int,
    compression: str | None = None,
    total: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Deal ``examples`` round-robin over ``num_shards`` shards (each with its index); returns the shard paths."""
    paths = shard_paths(out, num_shards, compression)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with ExitStack() as stack:
        writers = [stack.enter_context(TFRecordWriter(p, compression=normalize_compression(compression))) for p in paths]
        for i, example in enumerate(tqdm(examples, total=total, disable=not progress, unit="record")):
            writers[i % num_shards].write(example)
    return paths


def write_label_map(path: str, ids: Sequence[int], names: Sequence[str]) -> None:
    """A TF OD API ``label_map.pbtxt``: one ``item { id: N name: '...' }`` per class."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for cid, name in zip(ids, names):
            escaped = str(name).replace("\\", "\\\\").replace("'", "\\'")
            f.write(f"item {{\n  id: {int(cid)}\n  name: '{escaped}'\n}}\n")


_ITEM = re.compile(r"item\s*\{(.*?)\}", re.S)
_FIELD = re.compile(r"""(\w+)\s*:\s*(?:(-?\d+)|'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")


def read_label_map(path: str) -> tuple[list[int], list[str]]:
    """``(ids, names)`` from a TF OD API ``label_map.pbtxt``, sorted by id (``display_name`` wins over ``name``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    items: dict[int, str] = {}
    for number, body in enumerate(_ITEM.findall(text)):
        fields = {}
        for key, integer, single, double in _FIELD.findall(body):
            fields[key] = int(integer) if integer else re.sub(r"\\(.)", r"\1", single or double)
        if "id" not in fields:
            raise ValueError(f"{path}: item {number} has no id")
        if fields["id"] in items:
            raise ValueError(f"{path}: item {number} repeats id {fields['id']}")
        items[fields["id"]] = str(fields.get("display_name", fields.get("name", fields["id"])))
    if not items:
        raise ValueError(f"{path}: no 'item {{ id: ... }}' entries; not a label map")
    ids = sorted(items)
    return ids, [items[i] for i in ids]


def _image_info(encoded: bytes, where: str) -> tuple[int, int, str]:
    """``(height, width, format)`` of encoded image bytes, read from the header only."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.height, image.width, (image.format or "").lower()
    except (OSError, ValueError) as err:
        raise OSError(f"{where}: not a readable image: {err}") from err


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def coco_examples(source) -> Iterator[example_pb2.Example]:  # noqa: ANN001 - a datamodules.coco.COCODetectionSource
    """One detection Example per image of a parsed COCO json (images kept as their original bytes)."""
    ids = np.asarray(source.category_ids, dtype=np.int64)
    names = [n.encode("utf-8") for n in source.class_names]
    for i in range(len(source)):
        path, image_id = source.files[i], source.image_ids[i]
        encoded = _read(path)
        height, width, fmt = _image_info(encoded, f"COCO image {image_id} ({path})")
        expected = source.sizes[i]
        if expected is not None and expected != (height, width):
            raise ValueError(f"COCO image {image_id} in {source.annotation_file}: {path} is {height}x{width} (h x w) "
                             f"but the json says {expected[0]}x{expected[1]}")
        boxes, labels = source.boxes[i], source.labels[i]
        yield build_example({
            "image/encoded": bytes_feature(encoded),
            "image/format": bytes_feature(fmt),
            "image/filename": bytes_feature(os.path.basename(path)),
            "image/source_id": bytes_feature(str(image_id)),
            "image/height": int64_feature(height),
            "image/width": int64_feature(width),
            "image/object/bbox/xmin": float_feature(boxes[:, 0] / width),
            "image/object/bbox/ymin": float_feature(boxes[:, 1] / height),
            "image/object/bbox/xmax": float_feature(boxes[:, 2] / width),
            "image/object/bbox/ymax": float_feature(boxes[:, 3] / height),
            "image/object/class/label": int64_feature(ids[labels]),
            "image/object/class/text": bytes_feature([names[k] for k in labels]),
            "image/object/is_crowd": int64_feature(source.iscrowd[i]),
        })


def folder_classes(root: str) -> tuple[list[str], list[list[str]]]:
    """Class (identity) names and their image files, exactly as ``IdentityFolderDataModule`` scans ``root``.

    The same scan (sorted sub-folders, image files directly inside, folders without a readable image
    skipped with a warning) gives the same names and so the same labels from shards as from the folder.
    """
    from ..faces import scan_identity_folders  # albumentations + torch: only for this converter

    names, files = scan_identity_folders(root)
    if not names:
        raise ValueError(f"{root}: no sub-folders with images (expected ROOT/<class>/<image>)")
    return names, [[str(p) for p in group] for group in files]


def folder_examples(root: str, classes: Sequence[str], files: Sequence[Sequence[str]]) -> Iterator[example_pb2.Example]:
    """One classification Example per image of ``root/<class>/...``; ``image/class/label`` is the class index."""
    for label, (name, paths) in enumerate(zip(classes, files)):
        for path in paths:
            encoded = _read(path)
            height, width, fmt = _image_info(encoded, path)
            relative = os.path.relpath(path, root)
            yield build_example({
                "image/encoded": bytes_feature(encoded),
                "image/format": bytes_feature(fmt),
                "image/filename": bytes_feature(relative),
                "image/source_id": bytes_feature(relative),
                "image/height": int64_feature(height),
                "image/width": int64_feature(width),
                "image/class/label": int64_feature(label),
                "image/class/text": bytes_feature(name),
            })


def mask_pairs(images: str, masks: str, mask_suffix: str = ".png") -> list[tuple[str, str]]:
    """``(image, mask)`` paths as ``FolderSegmentationDataModule`` pairs them: ``masks/<image stem><mask_suffix>``."""
    from ..masks import list_images, pair_by_stem

    pairs = pair_by_stem(list_images(images), Path(masks), mask_suffix)
    if not pairs:
        raise ValueError(f"no images in {images}")
    return [(str(image), str(mask)) for image, mask in pairs]


def _png_of_class_ids(ids: np.ndarray, where: str) -> bytes:
    """An 8-bit greyscale PNG of class ids; ids outside 0..255 cannot be stored so and raise."""
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"mask {where}: class ids {ids.min()}..{ids.max()} do not fit an 8-bit PNG mask (0..255)")
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_examples(pairs: Sequence[tuple[str, str]]) -> Iterator[example_pb2.Example]:
    """One segmentation Example per (image, mask) pair; the mask is stored as a PNG of class indices.

    PNG masks of 8-bit ids (L or palette) are stored byte for byte; others are read as ``MaskDataModule``
    reads them (palette indices, grey RGB) and re-encoded, and a colour mask fails naming the file.
    """
    from ..masks import read_mask
    for image_path, mask_path in pairs:
        encoded = _read(image_path)
        height, width, fmt = _image_info(encoded, image_path)
        mask_bytes = _read(mask_path)
        with Image.open(io.BytesIO(mask_bytes)) as mask:
            if mask.size != (width, height):
                raise ValueError(f"mask {mask_path} is {mask.height}x{mask.width} (h x w) but image {image_path} "
                                 f"is {height}x{width}")
            stored_as_is = mask.format == "PNG" and mask.mode in ("L", "P")  # 8-bit class indices already
        if not stored_as_is:  # re-encode the class ids (never colours: read_mask refuses a colour mask)
            mask_bytes = _png_of_class_ids(read_mask(mask_path), mask_path)
        yield build_example({
            "image/encoded": bytes_feature(encoded),
            "image/format": bytes_feature(fmt),
            "image/filename": bytes_feature(os.path.basename(image_path)),
            "image/source_id": bytes_feature(os.path.splitext(os.path.basename(image_path))[0]),
            "image/height": int64_feature(height),
            "image/width": int64_feature(width),
            "image/segmentation/class/encoded": bytes_feature(mask_bytes),
            "image/segmentation/class/format": bytes_feature("png"),
        })
