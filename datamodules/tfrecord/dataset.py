"""Datasets over TFRecord shards: a sharded ``IterableDataset`` for training, a random-access one for the rest.

How :class:`TFRecordDataset` splits work. Lightning does not split iterable datasets, so the dataset
does it itself, across DDP ranks *and* DataLoader workers:

* With an index for every shard (``SHARD.index``, see :mod:`.index`) it splits by **record ranges**:
  the shards, in an order shuffled per epoch, form one sequence of ``N`` records; each rank takes a
  contiguous range, and each of its workers a contiguous part of that in whole batches (``batch_size``).
  Uneven shard sizes therefore still balance, every record is read exactly once per epoch, and
  ``len()`` is known. ``uneven`` makes ranks equal so DDP never waits on a rank that ran out:
  ``"pad"`` gives every rank ``ceil(N / world)`` records, repeating records from the start of the
  sequence; ``"drop"`` gives ``floor(N / world)`` and leaves the rest out (different records each epoch
  when shuffling); ``"none"`` splits exactly (ranks differ by at most one record: only safe when nothing
  synchronises per step, e.g. evaluation on one rank).
* Without indexes it falls back to a **shard-level** split over the workers of a single process (worker
  ``w`` reads shards ``w, w + W, ...``): exactly once, but shards are the unit of balance and the length
  is unknown. Under DDP that could leave ranks with different batch counts and hang, so it is refused
  (pass ``build_missing_index=True`` to scan the shards once, or write indexes beforehand).

Shuffling: the shard order is permuted with ``seed`` and the epoch, and samples pass through a buffer
of ``shuffle_buffer`` parsed records (decoded when they leave it, so the buffer holds encoded bytes).
The epoch comes from :meth:`TFRecordDataset.set_epoch` plus the number of iterations begun since,
counted in shared memory per worker, so it advances with persistent and non-persistent workers alike
without any hook (Lightning only calls ``set_epoch`` on samplers).

Resuming mid-epoch (with indexes): :meth:`TFRecordDataset.resume_position` sets the epoch of an interrupted
iteration and makes each worker skip, undecoded, the samples of the batches it had delivered, so the epoch goes on
with exactly the records not yet seen (:class:`datamodules.loaders.ResumableDataLoader` calls it from a checkpoint).
"""

from __future__ import annotations

import glob
import itertools
import os
import random
import warnings
from functools import partial
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .compression import detect_compression
from .features import Spec, normalize_spec, parse_example
from .framing import OVERHEAD_BYTES, CorruptRecordError, CorruptRecordWarning, decode_header, footer_crc, location, masked_crc32c
from .index import INDEX_SUFFIX, index_path, load_index, scan_shard
from .reader import OnCorrupt, RecordReader, StaleIndexError, is_exported, parse_record

Uneven = Literal["pad", "drop", "none"]
_MAX_WORKERS = 256  # slots of the shared epoch counter


def expand_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Paths from a path, a glob pattern, or a list of them (each pattern sorted; index files excluded)."""
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths: list[str] = []
    for pattern in map(os.fspath, patterns):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if not p.endswith(INDEX_SUFFIX))
            if not matches:
                raise FileNotFoundError(f"no TFRecord shards match {pattern!r}")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"TFRecord shard {pattern!r} does not exist")
    if not paths:
        raise ValueError("no TFRecord shards given")
    return paths


def rank_range(total: int, rank: int, world_size: int, uneven: Uneven) -> tuple[int, int]:
    """The range ``[start, stop)`` of the record sequence a rank reads; positions ``>= total`` wrap (padding)."""
    if uneven == "pad":
        per_rank = -(-total // world_size)
    elif uneven == "drop":
        per_rank = total // world_size
    elif uneven == "none":
        return rank * total // world_size, (rank + 1) * total // world_size
    else:
        raise ValueError(f"uneven must be 'pad', 'drop' or 'none', got {uneven!r}")
    return rank * per_rank, (rank + 1) * per_rank


def worker_range(start: int, stop: int, worker: int, num_workers: int, batch_size: int = 1) -> tuple[int, int]:
    """Split ``[start, stop)`` over workers in whole batches, so at most one worker yields a partial batch.

    The DataLoader then yields exactly ``ceil(n / batch_size)`` batches (``floor`` with ``drop_last``),
    which is what ``len(DataLoader)`` reports.
    """
    n = stop - start
    batches = -(-n // batch_size)
    first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
    return start + min(n, first * batch_size), start + min(n, last * batch_size)


def record_segments(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(shard, first_record, end_record)`` pieces covering positions ``[start, stop)`` of the sequence.

    The sequence is the shards' records in ``order``; positions past its end wrap to its start.
    """
    counts = np.asarray(counts, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    total = int(counts.sum())
    if stop > start and total == 0:
        raise ValueError("the shards hold no records")
    ends = np.cumsum(counts)
    pieces: list[tuple[int, int, int]] = []
    position = start
    while position < stop:
        p = position % total
        k = int(np.searchsorted(ends, p, side="right"))  # the shard (in order) holding position p
        first = p - int(ends[k] - counts[k])
        take = min(int(counts[k]) - first, stop - position)
        pieces.append((int(order[k]), first, first + take))
        position += take
    return pieces


def _distributed_rank_world() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, Lightning's ddp launcher
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _decode(decode: Callable[[Any], Any] | None, parsed: Any, where: str) -> Any:
    if decode is None:
        return parsed
    try:
        return decode(parsed)
    except Exception as err:
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"while decoding {where}")
        raise


class TFRecordDataset(IterableDataset):
    """Records of many shards, split across DDP ranks and DataLoader workers (see the module docstring).

    Args:
        files: shard paths or glob patterns (``"data/train-*.tfrecord"``); plain, ``.gz`` or ``.zlib``.
        features: tf.Example feature spec for :func:`parse_example` (None: every key in its own type).
        decode: turns a parsed record into a sample (e.g. decodes the JPEG); None keeps the dict.
        parse: replaces the tf.Example parser, e.g. ``partial(parse_sequence_example, context=..., sequence=...)``.
        compression: ``"auto"``, ``"gzip"``, ``"zlib"`` or None, for every shard.
        shuffle, shuffle_buffer, seed: per-epoch shard order and buffered sample shuffling.
        uneven: ``"pad"``, ``"drop"`` or ``"none"``: how ranks are made equal.
        batch_size: the DataLoader's batch size, so workers split in whole batches and ``len(DataLoader)``
            is exact; 1 splits by record.
        on_corrupt: ``"raise"`` or ``"skip"`` damaged records (CRC, truncation, undecodable payload). Skipped
            records are replaced by repeats of the same worker's good records, so per-rank counts stay equal
            (except with ``uneven="none"``). Spec mismatches and ``decode`` errors always raise.
        verify: check payload CRCs.
        rank, world_size: override the DDP rank / world size (default: torch.distributed, else the ``RANK``
            and ``WORLD_SIZE`` environment variables, else single process).
        build_missing_index: scan shards without an index file when the dataset is built (a full read of
            compressed shards) instead of falling back to the shard-level split.
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        features: Mapping[str, Spec] | None = None,
        decode: Callable[[Any], Any] | None = None,
        parse: Callable[[memoryview], Any] | None = None,
        compression: str | None = "auto",
        shuffle: bool = False,
        shuffle_buffer: int = 512,
        seed: int = 0,
        uneven: Uneven = "pad",
        batch_size: int = 1,
        on_corrupt: OnCorrupt = "raise",
        verify: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        build_missing_index: bool = False,
    ) -> None:
        super().__init__()
        if parse is not None and features is not None:
            raise ValueError("pass either features (for the tf.Example parser) or parse, not both")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        rank_range(1, 0, 1, uneven)  # validates uneven
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be >= 1")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        self.files = expand_files(files)
        self.compressions = [detect_compression(f, compression) for f in self.files]
        self.parse = parse if parse is not None else partial(parse_example, features=normalize_spec(features))
        self.decode = decode
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.uneven, self.batch_size = uneven, batch_size
        self.on_corrupt, self.verify = on_corrupt, verify
        self._explicit_dist = (rank, world_size) if rank is not None else None
        self._dist = _distributed_rank_world()  # remembered: spawned workers cannot ask torch.distributed
        self.indexes: list[np.ndarray | None] = []
        for path, comp in zip(self.files, self.compressions):
            index = load_index(path)
            if index is None and build_missing_index:
                index = scan_shard(path, comp)
            if index is not None and comp is None and len(index):
                end, size = int(index[-1].sum()), os.path.getsize(path)
                if size > end:
                    raise StaleIndexError(f"{path} has {size} bytes but its index {index_path(path)} ends at byte "
                                          f"{end}: rebuild it with `python -m datamodules.tfrecord.index --force {path}`")
            self.indexes.append(index)
        self.counts = None if any(i is None for i in self.indexes) else [len(i) for i in self.indexes]
        # [base epoch, iterations begun per worker slot...] in shared memory, so that workers and the
        # main process see the same epoch whether workers are forked per epoch or persistent.
        self._epoch_state = torch.zeros(1 + _MAX_WORKERS, dtype=torch.int64).share_memory_()
        # Samples each worker slot skips at the start of its next iteration (a resumed epoch, resume_position).
        self._skip_state = torch.zeros(_MAX_WORKERS, dtype=torch.int64).share_memory_()

    # -- epochs, ranks, length ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start counting epochs at ``epoch`` (the next iteration uses this epoch's shuffle)."""
        self._epoch_state[0] = epoch
        self._epoch_state[1:] = 0

    def epoch_in_progress(self) -> int:
        """The epoch of the iteration begun last (its shuffle), as seen by the main process."""
        begun = int(self._epoch_state[1:].max())
        return int(self._epoch_state[0]) + max(begun - 1, 0)

    def resume_position(self, epoch: int, batches: int, num_workers: int, batch_size: int, drop_last: bool) -> None:
        """Make the next iteration continue ``epoch`` after ``batches`` batches a DataLoader had delivered.

        A DataLoader with ``num_workers`` workers takes batches from its workers in turn (workers whose records
        ran out are passed over), so worker ``w`` had delivered a known number of batches; each worker skips those
        samples (``batch_size`` per batch) of its own stream, undecoded, and goes on exactly where it stopped.
        Needs the shard indexes (the split must be known); ``batch_size`` must be the one the dataset splits by.
        """
        if self.counts is None:
            raise ValueError("a TFRecordDataset without index files cannot resume mid-epoch (its split is unknown)")
        if batch_size != self.batch_size:
            raise ValueError(f"the DataLoader's batch_size {batch_size} differs from the dataset's {self.batch_size}")
        workers = max(num_workers, 1)
        rank, world = self._rank_world()
        start, stop = rank_range(sum(self.counts), rank, world, self.uneven)
        per_worker = []
        for w in range(workers):
            first, last = worker_range(start, stop, w, workers, self.batch_size)
            n = last - first
            per_worker.append(n // batch_size if drop_last else -(-n // batch_size))
        delivered = [0] * workers
        remaining = batches
        while remaining > 0 and any(d < c for d, c in zip(delivered, per_worker)):
            for w in range(workers):
                if remaining and delivered[w] < per_worker[w]:
                    delivered[w] += 1
                    remaining -= 1
        self.set_epoch(epoch)
        self._skip_state.zero_()
        for w, d in enumerate(delivered):
            self._skip_state[w % _MAX_WORKERS] = d * batch_size

    def _begin_epoch(self, worker: int) -> int:
        slot = 1 + worker % _MAX_WORKERS
        begun = int(self._epoch_state[slot])
        self._epoch_state[slot] = begun + 1
        return int(self._epoch_state[0]) + begun

    def _rank_world(self) -> tuple[int, int]:
        if self._explicit_dist is not None:
            return self._explicit_dist
        found = _distributed_rank_world()
        if found is not None and get_worker_info() is None:
            self._dist = found
        return found or self._dist or (0, 1)

    @property
    def num_records(self) -> int | None:
        """Records in all shards (None without indexes)."""
        return None if self.counts is None else sum(self.counts)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (summed over its workers); needs every shard's index."""
        if self.counts is None:
            missing = [f for f, i in zip(self.files, self.indexes) if i is None]
            raise TypeError(f"length unknown: {len(missing)} shard(s) have no index (e.g. {missing[0]}); build them "
                            "with `python -m datamodules.tfrecord.index SHARD...`")
        rank, world = self._rank_world()
        start, stop = rank_range(sum(self.counts), rank, world, self.uneven)
        return stop - start

    # -- iteration -----------------------------------------------------------------------------------

    def _plan(self, epoch: int, rank: int, world: int, worker: int, num_workers: int):
        """Segments ``(shard, first, end)`` this consumer reads (end None: whole shard) and its sample quota."""
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        if self.counts is None:
            if world > 1:
                raise ValueError(
                    "shards without index files cannot be split evenly across DDP ranks (ranks could get different "
                    "batch counts and hang): write indexes with `python -m datamodules.tfrecord.index SHARD...` or "
                    "pass build_missing_index=True")
            return [(int(s), 0, None) for s in order[worker::num_workers]], None
        start, stop = rank_range(sum(self.counts), rank, world, self.uneven)
        start, stop = worker_range(start, stop, worker, num_workers, self.batch_size)
        return record_segments(self.counts, order, start, stop), stop - start

    def _read(self, segments, warn: bool = True) -> Iterator[tuple[Any, str]]:
        """Parsed records of the segments with their location; corrupt ones raise or are skipped."""
        for shard, first, end in segments:
            path = self.files[shard]
            # warn=False on the refill pass: these records were reported already.
            reader = RecordReader(path, self.compressions[shard], verify=self.verify, on_corrupt=self.on_corrupt,
                                  index=self.indexes[shard], start=first, stop=end, warn=warn)
            for record, offset, payload in reader:
                try:
                    parsed = parse_record(self.parse, payload, path, record, offset)
                except CorruptRecordError as err:
                    if self.on_corrupt == "raise":
                        raise
                    if warn:
                        warnings.warn(f"skipped corrupt data: {err}", CorruptRecordWarning, stacklevel=2)
                    continue
                yield parsed, location(path, record, offset)

    def _samples(self, segments, quota: int | None) -> Iterator[tuple[Any, str]]:
        produced = 0
        for item in self._read(segments):
            produced += 1
            yield item
        if quota is None or produced >= quota or self.uneven == "none":
            return
        # Corrupt records were skipped: repeat good ones of the same range so every rank keeps its count.
        while produced < quota:
            before = produced
            for item in self._read(segments, warn=False):
                produced += 1
                yield item
                if produced == quota:
                    return
            if produced == before:
                raise ValueError(f"every record in this worker's range is corrupt ({segments}); cannot keep the "
                                 "per-rank sample count")

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        buffer: list = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(self.shuffle_buffer)
            yield buffer[j]
            buffer[j] = item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        epoch = self._begin_epoch(worker)
        segments, quota = self._plan(epoch, rank, world, worker, num_workers)
        items = self._samples(segments, quota)
        if self.shuffle:
            state = np.random.SeedSequence([self.seed, epoch, rank, worker]).generate_state(2)
            items = self._shuffled(items, random.Random(int(state[0]) << 32 | int(state[1])))
        skip = int(self._skip_state[worker % _MAX_WORKERS])
        if skip:  # a resumed epoch: these samples were delivered before the interruption
            self._skip_state[worker % _MAX_WORKERS] = 0
            items = itertools.islice(items, skip, None)
        for parsed, where in items:
            yield _decode(self.decode, parsed, where)


class TFRecordMapDataset(Dataset):
    """Random access to the records of indexed, uncompressed shards (``dataset[i]``).

    Needs ``SHARD.index`` beside every shard (``python -m datamodules.tfrecord.index``). GZIP/ZLIB shards
    cannot be read at random (a deflate stream must be decompressed from its start), so they are refused;
    use :class:`TFRecordDataset` for them. Corrupt records always raise (a map-style dataset has to return
    a sample for every index): :class:`CorruptRecordError` names shard, record and byte offset.
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        features: Mapping[str, Spec] | None = None,
        decode: Callable[[Any], Any] | None = None,
        parse: Callable[[memoryview], Any] | None = None,
        verify: bool = True,
    ) -> None:
        if parse is not None and features is not None:
            raise ValueError("pass either features (for the tf.Example parser) or parse, not both")
        self.files = expand_files(files)
        self.indexes = []
        for path in self.files:
            compression = detect_compression(path, "auto")
            if compression is not None:
                raise ValueError(f"{path} is {compression.upper()}-compressed: random access needs uncompressed shards "
                                 "(decompress it, e.g. `gunzip`, and rebuild its index) or use TFRecordDataset")
            index = load_index(path)
            if index is None:
                raise FileNotFoundError(f"{path} has no index {index_path(path)}: build it with "
                                        f"`python -m datamodules.tfrecord.index {path}`")
            if len(index) and int(index[-1].sum()) != os.path.getsize(path):
                raise StaleIndexError(f"{path} has {os.path.getsize(path)} bytes but its index ends at byte "
                                      f"{int(index[-1].sum())}: rebuild it with `python -m datamodules.tfrecord.index --force {path}`")
            self.indexes.append(index)
        self.parse = parse if parse is not None else partial(parse_example, features=normalize_spec(features))
        self.decode, self.verify = decode, verify
        self._starts = np.cumsum([0] + [len(i) for i in self.indexes])
        self._handles: dict[int, int] = {}
        self._pid = -1
        self._buffer = bytearray(1 << 16)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"], state["_buffer"] = {}, -1, bytearray(1 << 16)
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker must not share the parent's descriptors' lifetime
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._handles[shard]

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, record)`` of global item ``i``."""
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def read_payload(self, i: int) -> tuple[memoryview, str, int, int]:
        """The CRC-checked payload of item ``i`` (a view of a reused buffer, safe to keep), its shard, record and offset."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} records")
        shard, record = self.locate(i % n)
        path = self.files[shard]
        offset, framed = (int(v) for v in self.indexes[shard][record])
        if framed > len(self._buffer) or is_exported(self._buffer):  # never overwrite a payload still in use
            self._buffer = bytearray(max(framed, len(self._buffer)))
        view = memoryview(self._buffer)[:framed]
        got = _pread_into(self._fd(shard), view, offset)
        if got < framed:
            raise CorruptRecordError(path, record, offset, f"truncated record: the index lists {framed} bytes, the "
                                     f"shard ends after {got}")
        length, ok = decode_header(view)
        if not ok:
            raise CorruptRecordError(path, record, offset, f"length CRC mismatch (header bytes {bytes(view[:12]).hex()})")
        if length + OVERHEAD_BYTES != framed:
            raise StaleIndexError(f"{path}: record {record} at byte offset {offset} holds {length + OVERHEAD_BYTES} "
                                  f"framed bytes but the index says {framed}: rebuild the index")
        payload = view[12 : 12 + length]
        if self.verify and masked_crc32c(payload) != footer_crc(view[12 + length :]):
            raise CorruptRecordError(path, record, offset, "payload CRC mismatch: the record's bytes are damaged")
        return payload, path, record, offset

    def __getitem__(self, i: int) -> Any:
        payload, path, record, offset = self.read_payload(i)
        parsed = parse_record(self.parse, payload, path, record, offset)
        return _decode(self.decode, parsed, location(path, record, offset))


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read at ``offset`` into ``view`` without moving a shared file position (safe across threads)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[got:]], offset + got)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(view) - got, offset + got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got
