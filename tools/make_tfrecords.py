"""Convert a dataset on disk into sharded TFRecords (TF Object Detection API keys) with an index per shard.

    python tools/make_tfrecords.py coco --images DIR --annotations instances.json --out data/train \\
        --num-shards 16 [--compression gzip]
    python tools/make_tfrecords.py folder --root DIR --out data/faces --num-shards 8     # ROOT/<identity>/<image>
    python tools/make_tfrecords.py masks --images DIR --masks DIR --out data/seg --num-shards 8

Writes ``OUT-00000-of-000NN.tfrecord[.gz]`` (+ ``.index``) and, for ``coco`` and ``folder``,
``OUT.label_map.pbtxt`` naming the classes. The logic lives in ``datamodules.tfrecord.convert``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from datamodules.tfrecord import convert  # noqa: E402


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Parse arguments, convert, print what was written; returns the shard paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    coco = sub.add_parser("coco", help="COCO instances json + image folder -> detection shards")
    coco.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    coco.add_argument("--annotations", required=True, help="instances json")
    folder = sub.add_parser("folder", help="ROOT/<class or identity>/<image> -> classification shards")
    folder.add_argument("--root", required=True)
    masks = sub.add_parser("masks", help="image folder + mask folder (PNG class indices, same stems) -> segmentation shards")
    masks.add_argument("--images", required=True)
    masks.add_argument("--masks", required=True)
    masks.add_argument("--mask-suffix", default=".png", help="mask of image STEM.jpg is MASKS/STEM<suffix>")
    for p in (coco, folder, masks):
        p.add_argument("--out", required=True, help="output prefix, e.g. data/train")
        p.add_argument("--num-shards", type=int, default=1)
        p.add_argument("--compression", choices=["none", "gzip", "zlib"], default="none")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    compression = None if args.compression == "none" else args.compression

    if args.format == "coco":
        from datamodules.coco import COCODetectionSource

        source = COCODetectionSource(args.annotations, args.images)
        examples, total = convert.coco_examples(source), len(source)
        convert.write_label_map(args.out + ".label_map.pbtxt", source.category_ids, source.class_names)
    elif args.format == "folder":
        classes, files = convert.folder_classes(args.root)
        examples, total = convert.folder_examples(args.root, classes, files), sum(map(len, files))
        convert.write_label_map(args.out + ".label_map.pbtxt", range(len(classes)), classes)
    else:
        pairs = convert.mask_pairs(args.images, args.masks, args.mask_suffix)
        examples, total = convert.mask_examples(pairs), len(pairs)
    paths = convert.write_sharded(examples, args.out, args.num_shards, compression, total=total,
                                  progress=not args.no_progress)
    print(f"wrote {len(paths)} shard(s): {paths[0]}{' ...' if len(paths) > 1 else ''}")
    return paths


if __name__ == "__main__":
    main()
