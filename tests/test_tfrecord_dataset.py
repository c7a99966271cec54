"""TFRecordDataset: every record exactly once across DDP ranks x DataLoader workers, equal ranks, shuffling."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from datamodules.tfrecord import (
    CorruptRecordError,
    CorruptRecordWarning,
    FixedLen,
    TFRecordDataset,
    TFRecordMapDataset,
    TFRecordWriter,
    build_example,
    index_path,
    read_index,
)
from datamodules.tfrecord.dataset import rank_range, record_segments, worker_range

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SIZES = (5, 11, 3)  # uneven shards, 19 records: not divisible by 2 ranks or 6 consumers
SPEC = {"gid": FixedLen((), "int64")}


def gid(example: dict) -> int:
    """Decode: the record's global id (module level so DataLoader workers can use it)."""
    return int(example["gid"])


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    paths, gid_ = [], 0
    for s, n in enumerate(SIZES):
        path = tmp_path / f"train-{s:05d}.tfrecord"
        with TFRecordWriter(path) as writer:
            for _ in range(n):
                writer.write(build_example({"gid": [gid_], "shard": [s], "pixels": np.full(8, gid_, np.uint8)}))
                gid_ += 1
        paths.append(str(path))
    return paths


def read_rank(shards: list[str], rank: int, world: int, num_workers: int, batch_size: int = 1, **kwargs) -> list[list[int]]:
    """Batches one DDP rank sees through a real DataLoader with ``num_workers`` worker processes."""
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, rank=rank, world_size=world,
                              batch_size=batch_size, **kwargs)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    batches = list(loader)
    assert len(loader) == len(batches)  # len() from the index is exact, so progress bars and schedules are right
    return batches


@pytest.mark.parametrize("uneven", ["pad", "drop", "none"])
def test_exactly_once_across_2_ranks_x_3_workers(shards: list[str], uneven: str) -> None:
    per_rank = [read_rank(shards, rank, 2, num_workers=3, batch_size=2, uneven=uneven) for rank in (0, 1)]
    seen = collections.Counter(g for batches in per_rank for batch in batches for g in batch)
    counts = [sum(len(b) for b in batches) for batches in per_rank]
    if uneven == "pad":  # ceil(19 / 2) = 10 per rank: everything once, one record repeated
        assert counts == [10, 10] and set(seen) == set(range(19)) and sum(seen.values()) == 20
        assert sorted(seen.values()) == [1] * 18 + [2]
    elif uneven == "drop":  # floor(19 / 2) = 9 per rank: one record left out, none twice
        assert counts == [9, 9] and len(seen) == 18 and max(seen.values()) == 1
    else:  # exact split: every record exactly once
        assert counts == [9, 10] and seen == collections.Counter(range(19))
    if uneven != "none":  # equal batch counts per rank, so DDP never waits on a rank that ran out
        assert len(per_rank[0]) == len(per_rank[1])


def test_simulated_ranks_and_workers_without_processes(shards: list[str]) -> None:
    # The same split seen from inside: each (rank, worker) consumer's records, via the planning functions.
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, rank=0, world_size=1)
    consumers = []
    for rank in range(2):
        for worker in range(3):
            segments, quota = dataset._plan(epoch=0, rank=rank, world=2, worker=worker, num_workers=3)
            consumers.append([g for g in range(19) for s, a, b in segments
                              if sum(SIZES[:s]) + a <= g < sum(SIZES[:s]) + b])
            assert quota == sum(b - a for _, a, b in segments)
    assert sorted(g for c in consumers for g in c) == sorted(list(range(19)) + [0])  # pad repeats record 0


def test_single_process_and_workers_read_everything_once(shards: list[str]) -> None:
    assert sorted(TFRecordDataset(shards, features=SPEC, decode=gid)) == list(range(19))
    batches = read_rank(shards, 0, 1, num_workers=3, batch_size=4)
    assert sorted(g for b in batches for g in b) == list(range(19))
    assert [len(b) for b in batches].count(4) == 4  # only one partial batch across the 3 workers


def test_shard_level_fallback_without_indexes(shards: list[str]) -> None:
    for shard in shards:
        os.remove(index_path(shard))
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid)
    with pytest.raises(TypeError, match="no index"):
        len(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=3)
    assert sorted(loader) == list(range(19))
    with pytest.raises(ValueError, match="cannot be split evenly across DDP ranks.*datamodules.tfrecord.index"):
        list(TFRecordDataset(shards, features=SPEC, decode=gid, rank=0, world_size=2))
    scanned = TFRecordDataset(shards, features=SPEC, decode=gid, rank=1, world_size=2, build_missing_index=True)
    assert len(scanned) == 10 and len(list(scanned)) == 10


def test_shuffling_is_seeded_and_changes_per_epoch(shards: list[str]) -> None:
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=3)
    epoch0, epoch1 = list(dataset), list(dataset)
    assert sorted(epoch0) == sorted(epoch1) == list(range(19))
    assert epoch0 != epoch1 and epoch0 != list(range(19))
    dataset.set_epoch(0)
    assert list(dataset) == epoch0  # reproducible from seed and epoch
    other = TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=4)
    assert list(other) != epoch0


@pytest.mark.parametrize("persistent", [True, False])
def test_epochs_advance_in_worker_processes(shards: list[str], persistent: bool) -> None:
    # Lightning never calls set_epoch on an IterableDataset; the shared epoch counter must still advance
    # whether workers live across epochs or are started anew each epoch.
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=0,
                              rank=0, world_size=2)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=persistent)
    epochs = [list(loader) for _ in range(3)]
    assert all(len(e) == 10 for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    # Rank 1, iterated in lockstep, must see the complement each epoch (the same shard order).
    other = DataLoader(TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=0,
                                       rank=1, world_size=2), batch_size=None, num_workers=2,
                       persistent_workers=persistent)
    for mine in epochs:
        assert set(mine) | set(other) == set(range(19))


def test_skipped_records_keep_rank_counts_equal(shards: list[str]) -> None:
    index = read_index(index_path(shards[1]))
    offset = int(index[4, 0])
    data = bytearray(Path(shards[1]).read_bytes())
    data[offset + 20] ^= 0x01  # damage the payload of shard 1, record 4 (global id 9)
    Path(shards[1]).write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=rf"train-00001\.tfrecord: record 4 at byte offset {offset}: payload CRC"):
        list(TFRecordDataset(shards, features=SPEC, decode=gid))
    with pytest.warns(CorruptRecordWarning, match=rf"record 4 at byte offset {offset}"):
        ranks = [list(TFRecordDataset(shards, features=SPEC, decode=gid, rank=r, world_size=2, on_corrupt="skip"))
                 for r in (0, 1)]
    assert [len(r) for r in ranks] == [10, 10]  # the damaged record's slot is refilled by a repeat
    assert 9 not in ranks[0] + ranks[1] and set(ranks[0] + ranks[1]) == set(range(19)) - {9}


def test_map_dataset_random_access(shards: list[str], tmp_path: Path) -> None:
    dataset = TFRecordMapDataset(shards, features=SPEC, decode=gid)
    assert len(dataset) == 19
    assert [dataset[i] for i in (18, 0, 7, 5, -1)] == [18, 0, 7, 5, 18]
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, collate_fn=list)
    assert sorted(g for b in loader for g in b) == list(range(19))
    with pytest.raises(IndexError):
        dataset[19]
    squeezed = tmp_path / "c.tfrecord.gz"
    with TFRecordWriter(squeezed) as writer:
        writer.write(build_example({"gid": [0]}))
    with pytest.raises(ValueError, match="GZIP-compressed: random access needs uncompressed shards"):
        TFRecordMapDataset(squeezed)
    os.remove(index_path(shards[2]))
    with pytest.raises(FileNotFoundError, match="has no index .*python -m datamodules.tfrecord.index"):
        TFRecordMapDataset(shards)


def test_map_dataset_names_corrupt_records(shards: list[str]) -> None:
    offset = int(read_index(index_path(shards[0]))[2, 0])
    data = bytearray(Path(shards[0]).read_bytes())
    data[offset + 3] ^= 0x10  # the length field
    Path(shards[0]).write_bytes(bytes(data))
    dataset = TFRecordMapDataset(shards, features=SPEC, decode=gid)
    assert dataset[3] == 3
    with pytest.raises(CorruptRecordError, match=rf"train-00000\.tfrecord: record 2 at byte offset {offset}: length CRC"):
        dataset[2]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=5),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 5),
    st.sampled_from(["pad", "drop", "none"]),
    st.integers(0, 100),
)
def test_split_plan_covers_the_sequence(counts, world, workers, batch, uneven, seed) -> None:
    total = sum(counts)
    order = np.random.default_rng(seed).permutation(len(counts))
    starts = np.concatenate([[0], np.cumsum(counts)])
    sequence = [(int(s), r) for s in order for r in range(counts[s])]  # (shard, record) in reading order
    taken, per_rank = [], []
    for rank in range(world):
        start, stop = rank_range(total, rank, world, uneven)
        per_rank.append(stop - start)
        for worker in range(workers):
            a, b = worker_range(start, stop, worker, workers, batch)
            pieces = record_segments(counts, order, a, b) if b > a and total else []
            got = [(s, r) for s, first, end in pieces for r in range(first, end)]
            assert got == [sequence[p % total] for p in range(a, b)] if total else got == []
            assert all(starts[s] + r < starts[s + 1] for s, r in got)
            taken += got
    seen = collections.Counter(taken)
    if uneven == "none" or total % world == 0:
        assert seen == collections.Counter(sequence)
    elif uneven == "pad":
        assert set(seen) == set(sequence) and len(taken) == world * -(-total // world)
    else:
        assert max(seen.values(), default=1) == 1 and len(taken) == world * (total // world)
    if uneven != "none":
        assert len(set(per_rank)) == 1
