"""Convert a dataset on disk into sharded TFRecords (TF Object Detection API keys) with an index per shard.

    python tools/make_tfrecords.py coco --images DIR --annotations instances.json --out data/train \\
        --num-shards 16 [--compression gzip]
    python tools/make_tfrecords.py folder --root DIR --out data/faces --num-shards 8 [--seed 0]  # ROOT/<id>/<image>
    python tools/make_tfrecords.py masks --images DIR --masks DIR --out data/seg --num-shards 8
    python tools/make_tfrecords.py rec --rec /data/ms1m/train.rec --out data/ms1m --num-shards 64 [--seed 0]
    python tools/make_tfrecords.py features --layout lstr --root DIR --split train --out data/thumos_train

Writes ``OUT-00000-of-000NN.tfrecord[.gz]`` (+ ``.index``), records dealt round-robin over the shards
(as the OD API's ``open_sharded_output_tfrecords``), and, for ``coco``, ``folder`` and ``rec``,
``OUT.label_map.pbtxt`` naming the classes. ``folder`` and ``rec`` (an insightface RecordIO pack: the JPEGs
as stored, classes named by their number) write the images in a random order drawn from ``--seed``, so
shards mix identities. ``features`` writes one ``tf.SequenceExample`` per video (per-frame features as a
feature list, targets per frame) from the LSTR / TeSTra layout, OadTR's pickles or the synthetic streams.
The encoders live beside their DataModules (``datamodules.detection.tfrecord``, ``datamodules.faces.tfrecord``,
``datamodules.segmentation.tfrecord``, ``datamodules.features.tfrecord``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from tqdm import tqdm  # noqa: E402

from datamodules.tfrecord import write_label_map, write_sharded  # noqa: E402


def read_feature_sessions(args: argparse.Namespace):
    """The ``features`` subcommand's sessions, read with the DataModules' own readers."""
    if args.layout == "synthetic":
        from datamodules.synthetic.streams import make_feature_streams

        return make_feature_streams(args.num_sessions, seed=args.seed)
    if not args.root:
        raise SystemExit(f"--root is required for --layout {args.layout}")
    from datamodules.features.layouts import read_lstr_features, read_oadtr_pickles

    if args.layout == "lstr":
        return read_lstr_features(args.root, args.split, data_info=args.data_info or "data_info.json",
                                  visual_feature=args.visual_feature, motion_feature=args.motion_feature or None)
    tag = {"train": "val", "test": "test"}[args.split]
    return read_oadtr_pickles(args.root, args.split, data_info=args.data_info or "data_info_new.json",
                              feature_file=args.feature_file.format(split=tag),
                              anno_file=args.anno_file.format(split=tag))


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Parse arguments, convert, print what was written; returns the shard paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    coco = sub.add_parser("coco", help="COCO instances json + image folder -> detection shards")
    coco.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    coco.add_argument("--annotations", required=True, help="instances json")
    folder = sub.add_parser("folder", help="ROOT/<class or identity>/<image> -> classification shards")
    folder.add_argument("--root", required=True)
    folder.add_argument("--seed", type=int, default=0, help="seed of the record order (records are shuffled)")
    masks = sub.add_parser("masks", help="image folder + mask folder (PNG class indices, same stems) -> segmentation shards")
    masks.add_argument("--images", required=True)
    masks.add_argument("--masks", required=True)
    masks.add_argument("--mask-suffix", default=".png", help="mask of image STEM.jpg is MASKS/STEM<suffix>")
    rec = sub.add_parser("rec", help="insightface RecordIO pack (train.rec + train.idx) -> identity shards")
    rec.add_argument("--rec", required=True, help="the .rec file")
    rec.add_argument("--idx", default=None, help="its index (default: beside it with suffix .idx)")
    rec.add_argument("--seed", type=int, default=0, help="seed of the record order (records are shuffled)")
    feats = sub.add_parser("features", help="per-frame feature sessions (LSTR .npy, OadTR pickles or synthetic) -> "
                           "SequenceExample shards, one video per record")
    feats.add_argument("--layout", choices=["lstr", "oadtr", "synthetic"], required=True)
    feats.add_argument("--root", help="data root (lstr, oadtr)")
    feats.add_argument("--split", choices=["train", "test"], default="train")
    feats.add_argument("--data-info", help="data-info json name (default: the layout's)")
    feats.add_argument("--visual-feature", default="rgb_kinetics_resnet50", help="lstr: visual stream folder")
    feats.add_argument("--motion-feature", default="flow_kinetics_bninception",
                       help="lstr: motion stream folder ('' none)")
    feats.add_argument("--feature-file", default="thumos_all_feature_{split}_tsn_v2.pickle",
                       help="oadtr: feature pickle")
    feats.add_argument("--anno-file", default="thumos_{split}_anno.pickle", help="oadtr: annotation pickle")
    feats.add_argument("--num-sessions", type=int, default=64, help="synthetic: sessions")
    feats.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    for p in (coco, folder, masks, rec, feats):
        p.add_argument("--out", required=True, help="output prefix, e.g. data/train")
        p.add_argument("--num-shards", type=int, default=1)
        p.add_argument("--compression", choices=["none", "gzip", "zlib"], default="none")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    compression = None if args.compression == "none" else args.compression

    if args.format == "coco":
        from datamodules.detection.coco import COCODetectionSource
        from datamodules.detection.tfrecord import coco_examples

        source = COCODetectionSource(args.annotations, args.images)
        examples, total = coco_examples(source), len(source)
        write_label_map(args.out + ".label_map.pbtxt", source.category_ids, source.class_names)
    elif args.format == "folder":
        from datamodules.faces.tfrecord import folder_classes, folder_examples

        classes, files = folder_classes(args.root)
        examples, total = folder_examples(args.root, classes, files, args.seed), sum(map(len, files))
        write_label_map(args.out + ".label_map.pbtxt", range(len(classes)), classes)
    elif args.format == "rec":
        from datamodules.recordio import RecordIODataset
        from datamodules.faces.recordio import identity_count
        from datamodules.faces.tfrecord import recordio_examples

        records = RecordIODataset(args.rec, args.idx)
        classes = identity_count(records)
        examples, total = recordio_examples(records, args.seed), len(records)
        write_label_map(args.out + ".label_map.pbtxt", range(classes), [str(k) for k in range(classes)])
    elif args.format == "features":
        from datamodules.features.tfrecord import session_examples

        data = read_feature_sessions(args)
        examples, total = session_examples(data), len(data.sessions)
    else:
        from datamodules.segmentation.tfrecord import mask_examples, mask_pairs

        pairs = mask_pairs(args.images, args.masks, args.mask_suffix)
        examples, total = mask_examples(pairs), len(pairs)
    progress = tqdm(examples, total=total, disable=args.no_progress, unit="record")
    paths = write_sharded(progress, args.out, args.num_shards, compression)
    print(f"wrote {len(paths)} shard(s): {paths[0]}{' ...' if len(paths) > 1 else ''}")
    return paths


if __name__ == "__main__":
    main()
