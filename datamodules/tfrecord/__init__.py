"""TFRecord shards without TensorFlow: framing, compression, tf.Example codec, indexes, reading, (sharded) writing,
sharded datasets and TF OD API label maps.

    from datamodules.tfrecord import TFRecordWriter, read_records, parse_example, FixedLen, VarLen

    with TFRecordWriter("data/train-00000.tfrecord") as writer:      # also writes ...tfrecord.index
        writer.write(build_example({"image/encoded": jpeg, "label": 3}))
    for payload in read_records("data/train-00000.tfrecord"):
        example = parse_example(payload, {"image/encoded": FixedLen((), "bytes"), "label": FixedLen((), "int64")})

Shards written here are byte-for-byte what TensorFlow's ``tf.io.TFRecordWriter`` writes for the same
payloads, and TensorFlow's shards (plain, GZIP, ZLIB) read here.

A format library: it knows no DataModule and imports nothing else of ``datamodules`` (nor Lightning or
albumentations). What the records of a task hold, and the DataModules over them, live beside their
on-disk siblings: ``datamodules.detection.tfrecord``, ``datamodules.faces.tfrecord``,
``datamodules.segmentation.tfrecord``.
"""

from .compression import detect_compression
from .dataset import TFRecordDataset, TFRecordMapDataset, expand_files
from .features import (
    BYTES,
    FLOAT,
    INT64,
    FeatureError,
    FixedLen,
    VarLen,
    WireFormatError,
    build_example,
    build_sequence_example,
    bytes_feature,
    float_feature,
    int64_feature,
    normalize_spec,
    parse_example,
    parse_sequence_example,
    to_feature,
)
from .framing import CorruptRecordError, CorruptRecordWarning, masked_crc32c
from .index import index_path, load_index, read_index, scan_shard, write_index
from .label_map import read_label_map, write_label_map
from .reader import RecordReader, StaleIndexError, parse_record, read_examples, read_records
from .writer import TFRecordWriter, shard_paths, write_sharded

__all__ = [
    "BYTES",
    "FLOAT",
    "INT64",
    "CorruptRecordError",
    "CorruptRecordWarning",
    "FeatureError",
    "FixedLen",
    "RecordReader",
    "StaleIndexError",
    "TFRecordDataset",
    "TFRecordMapDataset",
    "TFRecordWriter",
    "VarLen",
    "WireFormatError",
    "build_example",
    "build_sequence_example",
    "bytes_feature",
    "detect_compression",
    "expand_files",
    "float_feature",
    "index_path",
    "int64_feature",
    "load_index",
    "masked_crc32c",
    "normalize_spec",
    "parse_example",
    "parse_sequence_example",
    "parse_record",
    "read_examples",
    "read_index",
    "read_label_map",
    "read_records",
    "scan_shard",
    "shard_paths",
    "to_feature",
    "write_index",
    "write_label_map",
    "write_sharded",
]
