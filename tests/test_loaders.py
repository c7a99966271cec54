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


# -- through Lightning: a checkpoint mid-epoch, a fit resumed from it ----------------------------------------------
def fit_recording(make_loader, max_steps: int, ckpt_path: Path | None = None, save_at: tuple[int, Path] | None = None):
    """Sample ids of every training batch of a fit; ``save_at=(step, path)`` saves a checkpoint after that step.

    ``configure_optimizers`` reads ``estimated_stepping_batches``, as every lit-tasks task does: Lightning then sets
    the loader up before it loads a checkpoint, and :class:`ExactResume` must hand the saved position over."""
    import lightning.pytorch as pl

    from lit_tasks.run.resume import ExactResume

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            ids = batch[0] if isinstance(batch[0], torch.Tensor) else torch.tensor(batch)
            self.seen.append(ids.tolist())
            return (self.weight - ids.float().mean()) ** 2

        def configure_optimizers(self):
            assert self.trainer.estimated_stepping_batches > 0
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if save_at is not None and trainer.global_step == save_at[0]:
                trainer.save_checkpoint(save_at[1])

    class Data(pl.LightningDataModule):  # as the DataModules give it (the loader made when Lightning asks)
        def train_dataloader(self):
            return make_loader()

    module = Recorder()
    # max_epochs with max_steps: estimated_stepping_batches sets the loader up (with max_epochs=-1 it would not)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ExactResume(), SaveAt()])
    trainer.fit(module, datamodule=Data(), ckpt_path=ckpt_path)
    return module.seen


def check_lightning_resume(make_loader, tmp_path: Path) -> None:
    """7 steps of 4-batch epochs; a checkpoint after step 3 (mid-epoch); the fit resumed from it trains steps 4-7 on
    the batches the uninterrupted fit had (the rest of epoch 0, then epoch 1)."""
    torch.manual_seed(0)
    uninterrupted = fit_recording(make_loader, 7, save_at=(3, tmp_path / "mid.ckpt"))
    torch.manual_seed(123)  # a new process would have other generator states: the checkpoint's must win
    resumed = fit_recording(make_loader, 7, ckpt_path=tmp_path / "mid.ckpt")
    assert len(uninterrupted) == 7 and resumed == uninterrupted[3:]


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resumes_a_shuffled_map_style_epoch(tmp_path, workers: int) -> None:
    check_lightning_resume(lambda: ResumableDataLoader(
        TensorDataset(torch.arange(16)), batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator(),
        num_workers=workers, persistent_workers=workers > 0), tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_resumes_a_tfrecord_epoch(tmp_path, shards, workers: int) -> None:
    """19 records in batches of 4, drop_last: 4 batches per epoch (with 2 workers: 2 each, epoch 0's last one from
    worker 1, so even the workers' interleaving after the resume is the uninterrupted one)."""
    check_lightning_resume(lambda: ResumableDataLoader(
        TFRecordDataset(shards, features=SPEC, decode=gid, shuffle=True, shuffle_buffer=4, seed=7, batch_size=4),
        batch_size=4, num_workers=workers, collate_fn=list, drop_last=True, persistent_workers=workers > 0), tmp_path)
