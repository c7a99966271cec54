"""TFRecord reading speed: our reader vs the `tfrecord` PyPI package vs a raw read of the same bytes.

    python benchmarks/tfrecord_speed.py [--records 2000] [--record-kb 100] [--repeats 5] [--dir DIR]

Writes one shard of ``--records`` tf.Examples in the TF Object Detection API layout (a JPEG of about
``--record-kb`` KB, labels, normalised boxes), warms the page cache, then times, round-robin so that
background load hits every method alike, and reports the median of ``--repeats`` passes:

(a) ours: framing + CRC32C of length and payload + tf.Example parsing with a feature spec; directly
    (``RecordReader`` + ``parse_example``) and as ``TFRecordDataset`` through a DataLoader;
(b) the ``tfrecord`` package (``pip install tfrecord``, in the ``bench`` extra): its
    ``tfrecord.torch.TFRecordDataset`` through a DataLoader and its ``tfrecord_loader``; note that it
    does not verify CRCs, so it does less work than (a);
(c) ``readinto`` of the whole file in 1 MiB chunks into one buffer: the ceiling for any reader.
Also: framing + CRC alone, a DataLoader over already-parsed dicts (what any dataset yielding such
dicts pays the DataLoader per sample, so the ceiling of every "via DataLoader" row), the same fields through the protobuf runtime (``example_pb2``), (a) without
the ``_wire`` C scanner (as on a machine that could not build it), and (a) on a GZIP copy of the shard. Targets from issue 3: (a) >= 3x (b)'s dataset and >= 25% of (c).

(d) End to end: detection training batches/s (decode + augment + collate) from TFRecord shards written
by ``make_tfrecords.py coco``'s converter vs ``COCODetectionDataModule`` on the same JPEG folder, same
transforms. Target: the TFRecord path is not slower.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from functools import partial
from typing import Callable

import numpy as np
from PIL import Image
from timing import time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)
from torch.utils.data import DataLoader, IterableDataset

from datamodules.tfrecord import features as features_module
from datamodules.tfrecord import (
    FixedLen,
    RecordReader,
    TFRecordDataset,
    TFRecordWriter,
    VarLen,
    example_pb2,
    normalize_spec,
    parse_example,
)

BOX_KEYS = [f"image/object/bbox/{k}" for k in ("xmin", "ymin", "xmax", "ymax")]
SPEC = normalize_spec({  # normalised once, as a DataModule does
    "image/encoded": FixedLen((), "bytes"),
    "image/object/class/label": VarLen("int64"),
    **{k: VarLen("float") for k in BOX_KEYS},
})
PACKAGE_DESCRIPTION = {"image/encoded": "byte", "image/object/class/label": "int", **{k: "float" for k in BOX_KEYS}}


def make_jpegs(target_kb: int, count: int = 16, seed: int = 0) -> list[bytes]:
    """Noise JPEGs of roughly ``target_kb`` KB (noise does not compress, so size tracks pixel count)."""
    rng = np.random.default_rng(seed)
    side = 64
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        if buffer.tell() >= target_kb * 1000:
            break
        side += 8
    jpegs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_shard(path: str, records: int, record_kb: int) -> None:
    rng = np.random.default_rng(1)
    jpegs = make_jpegs(record_kb)
    with TFRecordWriter(path) as writer:
        for i in range(records):
            n = int(rng.integers(1, 8))
            boxes = np.sort(rng.random((n, 2, 2)), axis=1).reshape(n, 4)  # xmin<xmax, ymin<ymax after reshape
            example = example_pb2.Example()
            feature = example.features.feature
            feature["image/encoded"].bytes_list.value.append(jpegs[i % len(jpegs)])
            feature["image/format"].bytes_list.value.append(b"jpeg")
            feature["image/source_id"].bytes_list.value.append(str(i).encode())
            feature["image/height"].int64_list.value.append(480)
            feature["image/width"].int64_list.value.append(640)
            feature["image/object/class/label"].int64_list.value.extend(rng.integers(0, 80, n).tolist())
            for column, key in zip((0, 2, 1, 3), BOX_KEYS):
                feature[key].float_list.value.extend(boxes[:, column].tolist())
            writer.write(example)


def raw_readinto(path: str) -> int:
    buffer = memoryview(bytearray(1 << 20))
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def ours_framing(path: str) -> int:
    return sum(1 for _ in RecordReader(path))


def ours_parse(path: str) -> int:
    count = 0
    for _, _, payload in RecordReader(path):
        example = parse_example(payload, SPEC)
        count += len(example["image/encoded"]) > 0
    return count


def ours_parse_upb(path: str) -> int:
    """(a) as a machine without a C compiler runs it: every record parsed by the protobuf runtime."""
    saved, features_module._wire = features_module._wire, None
    try:
        return ours_parse(path)
    finally:
        features_module._wire = saved


def ours_dataset(path: str) -> int:
    loader = DataLoader(TFRecordDataset(path, features=SPEC), batch_size=None, num_workers=0)
    return sum(1 for _ in loader)


def protobuf_parse(path: str) -> int:
    """The same fields through the generated protobuf classes (framing and CRCs by our reader)."""
    count = 0
    for _, _, payload in RecordReader(path):
        features = example_pb2.Example.FromString(payload).features.feature
        image = features["image/encoded"].bytes_list.value[0]
        labels = np.array(features["image/object/class/label"].int64_list.value[:], dtype=np.int64)
        boxes = [np.array(features[k].float_list.value[:], dtype=np.float32) for k in BOX_KEYS]
        count += len(image) > 0 and len(labels) == len(boxes[0])
    return count


class _Parsed(IterableDataset):
    """Records parsed beforehand: a DataLoader over it costs only the DataLoader's own per-sample work."""

    def __init__(self, path: str) -> None:
        self.samples = [parse_example(payload, SPEC) for _, _, payload in RecordReader(path)]

    def __iter__(self):
        return iter(self.samples)


def dataloader_only(dataset: _Parsed) -> int:
    return sum(1 for _ in DataLoader(dataset, batch_size=None, num_workers=0))


def package_dataset(path: str) -> int:
    import tfrecord.torch

    dataset = tfrecord.torch.TFRecordDataset(path, None, PACKAGE_DESCRIPTION)
    return sum(1 for _ in DataLoader(dataset, batch_size=None, num_workers=0))


def package_loader(path: str) -> int:
    from tfrecord.reader import tfrecord_loader

    return sum(1 for _ in tfrecord_loader(path, None, PACKAGE_DESCRIPTION))


def detection_end_to_end(images: int, size: int, repeats: int, directory: str | None) -> dict:
    """(d) detection batches/s, decode + augment + collate: COCO folder vs TFRecord shards of the same JPEGs.

    Both use the same training transforms and batch size, one process (num_workers=0) so the loader's
    own work is what is timed.
    """
    import json as json_module

    from datamodules import COCODetectionDataModule, TFRecordDetectionDataModule
    from datamodules.detection.coco import COCODetectionSource
    from datamodules.synthetic import SHAPE_CLASSES, render_shapes
    from datamodules.tfrecord import write_label_map, write_sharded
    from datamodules.detection.tfrecord import coco_examples

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        os.makedirs(os.path.join(tmp, "train2017"))
        os.makedirs(os.path.join(tmp, "annotations"))
        entries, annotations = [], []
        for i in range(images):
            shapes = render_shapes(i, seed=7, image_size=size)
            name = f"{i:06d}.jpg"
            Image.fromarray(shapes["image"]).save(os.path.join(tmp, "train2017", name), quality=90)
            entries.append({"id": i, "file_name": name, "height": size, "width": size})
            for box, label in zip(shapes["boxes"].tolist(), shapes["labels"].tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0})
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(SHAPE_CLASSES)]
        annotation_file = os.path.join(tmp, "annotations", "instances_train2017.json")
        with open(annotation_file, "w") as f:
            json_module.dump({"images": entries, "annotations": annotations, "categories": categories}, f)
        source = COCODetectionSource(annotation_file, os.path.join(tmp, "train2017"))
        out = os.path.join(tmp, "tfr", "train")
        write_sharded(coco_examples(source), out, num_shards=4)
        write_label_map(out + ".label_map.pbtxt", source.category_ids, source.class_names)
        common = dict(image_size=size, batch_size=8, num_workers=0)
        coco = COCODetectionDataModule(tmp, train_annotations="annotations/instances_train2017.json",
                                       val_annotations="annotations/instances_train2017.json",
                                       val_images="train2017", **common)
        tfr = TFRecordDetectionDataModule(out + "-*.tfrecord", out + "-*.tfrecord", out + ".label_map.pbtxt", **common)
        loaders = {"COCO folder": coco.train_dataloader(), "TFRecord shards": tfr.train_dataloader()}
        counts: dict[str, int] = {}

        def count(name: str) -> None:
            counts[name] = sum(1 for _ in loaders[name])

        # The warm-up pass: page cache, imports.
        times = time_calls({name: partial(count, name) for name in loaders}, warmup=1, repeats=repeats,
                           alternate=False)
    rates = {name: counts[name] / timing.median for name, timing in times.items()}
    print(f"\n(d) end to end, detection training batches (8 x {size}px JPEG, decode + augment + collate, "
          f"{images} images, median of {repeats}):")
    for name, rate in rates.items():
        print(f"{name:52s} {rate:10.2f} batches/s")
    ratio = rates["TFRecord shards"] / rates["COCO folder"]
    print(f"TFRecord / COCO folder:                {ratio:5.2f}   (target >= 1: not slower)")
    return {"batches_per_s": rates, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--record-kb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--detection-images", type=int, default=256,
                        help="images for the end-to-end detection comparison (0 skips it)")
    parser.add_argument("--detection-size", type=int, default=320, help="their side in pixels (JPEG)")
    args = parser.parse_args()

    try:
        import tfrecord  # noqa: F401
        have_package = True
    except ImportError:
        have_package = False
        print("the `tfrecord` package is not installed (pip install tfrecord): part (b) is skipped")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain = os.path.join(tmp, "bench.tfrecord")
        squeezed = os.path.join(tmp, "bench.tfrecord.gz")
        write_shard(plain, args.records, args.record_kb)
        with TFRecordWriter(squeezed, level=1) as writer:
            for _, _, payload in RecordReader(plain):
                writer.write(payload)
        size = os.path.getsize(plain)
        methods: dict[str, tuple[Callable[[str], int], str]] = {
            "(c) raw readinto, 1 MiB chunks": (raw_readinto, plain),
            "framing + CRC32C only (ours)": (ours_framing, plain),
            "(a) ours: RecordReader + parse_example": (ours_parse, plain),
            "(a) ours without the C scanner (upb parses)": (ours_parse_upb, plain),
            "(a) ours: TFRecordDataset via DataLoader": (ours_dataset, plain),
            "framing + CRC32C + protobuf runtime parse": (protobuf_parse, plain),
            "(a) ours on GZIP shard (level 1)": (ours_parse, squeezed),
        }
        methods["DataLoader alone over parsed dicts (its ceiling)"] = (dataloader_only, _Parsed(plain))
        if have_package:
            methods["(b) tfrecord pkg: TFRecordDataset via DataLoader"] = (package_dataset, plain)
            methods["(b) tfrecord pkg: tfrecord_loader"] = (package_loader, plain)
        # The warm-up pass warms the page cache and every code path.
        times = time_calls({name: partial(fn, path) for name, (fn, path) in methods.items()}, warmup=1,
                           repeats=args.repeats, alternate=False)

    print(f"\n{args.records} records, {size / args.records / 1000:.1f} KB each ({size / 1e6:.0f} MB), "
          f"median of {args.repeats} passes, page cache warm\n")
    # CPU seconds are reported too: on a shared machine they are steadier than wall time.
    print(f"{'method':52s} {'records/s':>10s} {'MB/s':>8s} {'rec/CPU-s':>10s}")
    results = {}
    for name in times:
        seconds, cpu_seconds = times[name].median, times[name].median_cpu
        results[name] = {"records_per_s": args.records / seconds, "mb_per_s": size / seconds / 1e6,
                         "records_per_cpu_s": args.records / cpu_seconds}
        print(f"{name:52s} {args.records / seconds:10.0f} {size / seconds / 1e6:8.0f} {args.records / cpu_seconds:10.0f}")
    raw = results["(c) raw readinto, 1 MiB chunks"]
    print("\nratios (wall clock; CPU time in brackets)")

    def ratio(key: str, reference: str) -> str:
        a, b = results[key], results[reference]
        return f"{a['records_per_s'] / b['records_per_s']:5.2f} [{a['records_per_cpu_s'] / b['records_per_cpu_s']:5.2f}]"

    parse, dataset = "(a) ours: RecordReader + parse_example", "(a) ours: TFRecordDataset via DataLoader"
    print(f"(a) reader + parse / (c) raw read:              {ratio(parse, '(c) raw readinto, 1 MiB chunks')}   (target >= 0.25)")
    if have_package:
        package = "(b) tfrecord pkg: TFRecordDataset via DataLoader"
        print(f"(a) reader + parse / (b) package dataset:       {ratio(parse, package)}   (target >= 3)")
        # Through a DataLoader both datasets pay its per-sample conversion; the row above it is the ceiling.
        print(f"(a) dataset via DataLoader / (b) same:          {ratio(dataset, package)}   (for reference)")
    ceiling = "DataLoader alone over parsed dicts (its ceiling)"
    print(f"(a) dataset via DataLoader / DataLoader alone:  {ratio(dataset, ceiling)}   (for reference)")
    if args.detection_images:
        results["detection"] = detection_end_to_end(args.detection_images, args.detection_size, args.repeats, args.dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": args.records, "bytes": size, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
