"""Compatibility with the `tfrecord` PyPI package (the `bench` extra): same index format, each reads the other's shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tfrecord = pytest.importorskip("tfrecord")
from tfrecord.tools.tfrecord2idx import create_index  # noqa: E402

from datamodules.tfrecord import (  # noqa: E402
    TFRecordDataset,
    TFRecordWriter,
    build_example,
    index_path,
    parse_example,
    read_records,
)

DATA = Path(__file__).parent / "data" / "tfrecord"


@pytest.mark.parametrize("name", ["examples.tfrecord", "object_detection.tfrecord", "sequence_examples.tfrecord"])
def test_index_files_match_the_tfrecord_package(name: str, tmp_path: Path) -> None:
    shard = tmp_path / name
    with TFRecordWriter(shard) as writer:  # writes shard.index
        for payload in read_records(DATA / name):
            writer.write(bytes(payload))
    create_index(str(shard), str(tmp_path / "theirs.index"))
    assert Path(index_path(shard)).read_text() == (tmp_path / "theirs.index").read_text()


def test_each_package_reads_the_others_shards(tmp_path: Path) -> None:
    ours = tmp_path / "ours.tfrecord"
    with TFRecordWriter(ours) as writer:
        for k in range(7):
            writer.write(build_example({"label": [k], "box": [0.25 * k, 0.5], "name": f"n{k}"}))
    # The package reads our shard and seeks with our index (it starts at a random record, then wraps).
    loaded = list(tfrecord.torch.TFRecordDataset(str(ours), index_path(ours), {"label": "int", "box": "float"}))
    by_label = {int(r["label"][0]): r for r in loaded}
    assert sorted(by_label) == list(range(7)) and len(loaded) == 7
    assert np.array_equal(by_label[3]["box"], np.array([0.75, 0.5], dtype=np.float32))
    theirs = tmp_path / "theirs.tfrecord"
    writer = tfrecord.TFRecordWriter(str(theirs))
    for k in range(5):
        writer.write({"label": (k, "int"), "blob": (bytes([k]) * 10, "byte"), "f": ([1.5, -k], "float")})
    writer.close()
    parsed = [parse_example(p) for p in read_records(theirs)]  # CRCs verified on the way
    assert [int(p["label"][0]) for p in parsed] == list(range(5))
    assert parsed[4]["blob"] == [b"\x04" * 10] and parsed[2]["f"].tolist() == [1.5, -2.0]
    create_index(str(theirs), index_path(theirs))
    assert len(TFRecordDataset(theirs)) == 5
