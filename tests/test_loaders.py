"""ResumableDataLoader: a pass interrupted after some batches continues, once restored, with exactly the batches an
uninterrupted pass would still have given (map-style and DistributedSampler orders, TFRecord shards with workers)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from datamodules.loaders import ResumableDataLoader
from datamodules.tfrecord import FixedLen, TFRecordDataset, TFRecordWriter, build_example

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def ids(batches) -> list[list[int]]:
    return [b[0].tolist() if isinstance(b, (list, tuple)) and torch.is_tensor(b[0]) else list(b) for b in batches]


def shuffled_loader(num_workers: int = 0, batch_size: int = 3, **kwargs) -> ResumableDataLoader:
    return ResumableDataLoader(TensorDataset(torch.arange(23)), batch_size=batch_size, shuffle=True, drop_last=True,
                               generator=torch.Generator(), num_workers=num_workers, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_pass_gives_the_remaining_batches_of_the_same_order(num_workers: int) -> None:
    torch.manual_seed(1)
    full = ids(shuffled_loader(num_workers))  # 7 batches of 3 (23 samples, last 2 dropped)
    torch.manual_seed(1)
    interrupted = shuffled_loader(num_workers)
    iterator = iter(interrupted)
    assert ids(next(iterator) for _ in range(4)) == full[:4]
    state = interrupted.state_dict()
    assert state["batches"] == 4 and state["length"] == 7
    torch.manual_seed(12345)  # the resumed process's generator is elsewhere: the saved seed decides the order
    resumed = shuffled_loader(num_workers)
    resumed.load_state_dict(state)
    assert ids(resumed) == full[4:]
    assert resumed.state_dict()["batches"] == 7
    following = ids(resumed)  # the next pass is a fresh order of every sample, nothing skipped
    assert len(following) == 7 and following != full
    assert len({i for b in following for i in b}) == 21


def test_a_state_at_the_end_of_a_pass_restores_a_fresh_pass() -> None:
    loader = shuffled_loader()
    list(loader)
    resumed = shuffled_loader()
    resumed.load_state_dict(loader.state_dict())
    assert len(ids(resumed)) == 7


def test_a_distributed_sampler_order_is_replayed_from_its_epoch() -> None:
    data = TensorDataset(torch.arange(20))

    def loader() -> ResumableDataLoader:
        sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
        return ResumableDataLoader(data, batch_size=2, sampler=sampler, drop_last=True)

    original = loader()
    original.sampler.set_epoch(5)
    full = ids(original)
    original.sampler.set_epoch(5)
    iterator = iter(original)
    next(iterator), next(iterator)
    state = original.state_dict()
    assert state["sampler_epoch"] == 5 and state["num_replicas"] == 2
    resumed = loader()  # a new sampler, at epoch 0: the saved epoch is set before its indices are drawn
    resumed.load_state_dict(state)
    assert ids(resumed) == full[2:]


def test_a_changed_loader_cannot_resume_and_says_so() -> None:
    loader = shuffled_loader()
    iterator = iter(loader)
    next(iterator)
    with pytest.warns(UserWarning, match=r"changed \(length 7 -> 5, batch_size 3 -> 4\).*fresh order"):
        other = shuffled_loader(batch_size=4)
        other.load_state_dict(loader.state_dict())
    assert len(ids(other)) == 5  # a whole fresh pass


# -- TFRecord shards ----------------------------------------------------------------------------------------------
SIZES = (5, 11, 3)  # 19 records in uneven shards
SPEC = {"gid": FixedLen((), "int64")}


def gid(example: dict) -> int:
    return int(example["gid"])


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    paths, next_id = [], 0
    for s, n in enumerate(SIZES):
        path = tmp_path / f"train-{s:05d}.tfrecord"
        with TFRecordWriter(path) as writer:  # writes the .index beside the shard
            for _ in range(n):
                writer.write(build_example({"gid": [next_id]}))
                next_id += 1
        paths.append(str(path))
    return paths


def tfrecord_loader(shards: list[str], num_workers: int, drop_last: bool) -> ResumableDataLoader:
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=7, batch_size=2)
    return ResumableDataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=list, drop_last=drop_last)


@pytest.mark.parametrize("num_workers,drop_last", [(0, False), (3, False), (3, True)])
def test_a_tfrecord_epoch_continues_after_the_delivered_batches(shards, num_workers: int, drop_last: bool) -> None:
    """Epoch 1 (a second pass: its own shuffle) interrupted after 4 batches continues with exactly the batches not yet
    delivered: in the same order with one process; with 3 workers (3, 3 and 4 batches, one partial) the same batches,
    possibly interleaved differently (the DataLoader starts its round over the workers again)."""
    reference = tfrecord_loader(shards, num_workers, drop_last)
    ids(reference)
    full = ids(reference)  # epoch 1
    interrupted = tfrecord_loader(shards, num_workers, drop_last)
    ids(interrupted)
    iterator = iter(interrupted)
    delivered = [next(iterator) for _ in range(4)]
    assert delivered == full[:4]
    state = interrupted.state_dict()
    assert state["dataset_epoch"] == 1 and state["batches"] == 4
    resumed = tfrecord_loader(shards, num_workers, drop_last)  # a fresh process: its dataset starts at epoch 0
    resumed.load_state_dict(state)
    rest = ids(resumed)
    if num_workers == 0:
        assert rest == full[4:]
    assert collections.Counter(map(tuple, rest)) == collections.Counter(map(tuple, full[4:]))
    assert len(rest) == len(resumed) - 4
    assert ids(resumed) == ids(reference)  # and epoch 2 follows as in the uninterrupted run


def test_tfrecord_shards_without_indexes_say_the_epoch_restarts(shards) -> None:
    for shard in shards:
        Path(shard + ".index").unlink()
    loader = tfrecord_loader(shards, 0, False)
    iterator = iter(loader)
    next(iterator)
    with pytest.warns(UserWarning, match="cannot restore a position: the resumed epoch re-reads its records from the "
                                         "start"):
        tfrecord_loader(shards, 0, False).load_state_dict(loader.state_dict())


def test_the_worker_split_of_a_resumed_epoch_is_the_round_robin_of_delivered_batches(shards) -> None:
    dataset = TFRecordDataset(shards, features=SPEC, decode=gid, batch_size=2)
    dataset.resume_position(epoch=3, batches=5, num_workers=3, batch_size=2, drop_last=False)
    # 19 records = 10 batches split 3 / 3 / 4 over the workers; 5 delivered in turns: w0, w1, w2, w0, w1
    assert dataset._skip_state[:3].tolist() == [4, 4, 2] and dataset.epoch_in_progress() == 3
    with pytest.raises(ValueError, match="batch_size 4 differs from the dataset's 2"):
        dataset.resume_position(epoch=0, batches=1, num_workers=1, batch_size=4, drop_last=False)
    np.testing.assert_array_equal(dataset._skip_state[3:].numpy(), 0)
