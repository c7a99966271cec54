"""The TFRecord DataModules' shared argument block: which shards each split reads and how."""

from __future__ import annotations

import pytest

from datamodules.tfrecord import FixedLen, TFRecordWriter, build_example, int64_feature
from datamodules.tfrecord_shards import TFRecordShards


def shard(path, values: list[int]) -> str:
    """A plain shard of one-int examples ``{"x": value}``."""
    with TFRecordWriter(str(path)) as writer:
        for value in values:
            writer.write(build_example({"x": int64_feature(value)}).SerializeToString())
    return str(path)


def test_test_shards_default_to_the_validation_shards():
    assert TFRecordShards.of_splits(train_files="t*", val_files="v*").files == {"train": "t*", "val": "v*", "test": "v*"}
    assert TFRecordShards.of_splits(train_files="t*", val_files="v*", test_files="s*").files["test"] == "s*"


@pytest.mark.parametrize("k, split, shuffle, uneven", [(0, "train", True, "pad"), (1, "val", False, "none"),
                                                      (2, "test", False, "none")])
def test_training_shuffles_and_pads_evaluation_reads_every_record_once(tmp_path, k, split, shuffle, uneven):
    files = {name: shard(tmp_path / f"{name}.tfrecord", [n, n + 10]) for n, name in enumerate(("train", "val", "test"))}
    shards = TFRecordShards(files, shuffle_buffer=7, seed=3, on_corrupt="skip")
    ds = shards.dataset(split, features={"x": FixedLen((), "int64")}, decode=lambda e: int(e["x"]), batch_size=2)
    assert (ds.shuffle, ds.uneven, ds.shuffle_buffer, ds.seed, ds.on_corrupt, ds.batch_size) == (
        shuffle, uneven, 7, 3, "skip", 2)
    assert sorted(ds) == [k, k + 10]
