"""Face training data speed: RecordIO vs TFRecord vs an image folder (same JPEGs); RecordIO raw reads vs MXNet.

    python benchmarks/face_data_speed.py [--images 3000] [--repeats 3] [--workers 1 2] [--dir DIR]
        [--mxnet-python /tmp/mxenv/bin/python]

Writes ``--images`` synthetic 112x112 faces (JPEG quality 95, 4:2:0, as insightface packs them) three ways: an
identity folder (``root/<id>/<n>.jpg``), an insightface RecordIO pack (header record 0, images, identity records:
the MS1M layout) and identity TFRecord shards (``make_tfrecords.py folder``'s encoder). Then, round-robin so that
background load hits every method alike, the median of ``--repeats`` passes of:

(a) raw reads, no decode: every image record's payload and IRHeader in a random order (as a shuffled sampler asks
    for them), through our ``IndexedRecordIO`` (``os.pread`` of the record's extent), through MXNet's own
    ``MXIndexedRecordIO.read_idx`` + ``mx.recordio.unpack`` (dmlc's C++ reader; run by ``--mxnet-python``, a
    throwaway environment: ``python -m venv /tmp/mxenv && /tmp/mxenv/bin/pip install mxnet "numpy<1.24"``), and
    through a plain Python reader of the format (file object ``seek`` + ``read`` of the chunk header and payload).
    Target (issue 15): ours at least as fast as MXNet's.
(b) training samples per second (decode + random flip + to tensor + collate, batches of 128) through a DataLoader
    with 1 and 2 workers, from the RecordIO DataModule, the TFRecord DataModule and the folder DataModule. The
    clock starts when the first batch arrives (worker start-up excluded) and stops at the last. Target: RecordIO
    within 10 % of the image folder.
(c) CPU time per training sample (``time.process_time``, in this process, no DataLoader) of the same three
    datasets: what (b) costs without the scheduling noise of a shared machine.

Raw reads (a) are timed in process CPU time too (MXNet's inside its own process), for the same reason.

Run with ``OMP_NUM_THREADS=2`` on a quiet machine and report the load (``uptime``) with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timing import Stopwatch  # noqa: E402  (benchmarks/ is on the path when a script runs)

from datamodules.recordio import (  # noqa: E402
    CHUNK_HEADER,
    IR_HEADER,
    LENGTH_MASK,
    IndexedRecordIO,
    IRHeader,
    pack_record,
    write_recordio,
)

PER_IDENTITY = 20
BATCH = 128

MXNET_READER = r"""
import json, sys, time
import numpy as np
import mxnet as mx
idx, rec, keys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
reader.read_idx(keys[0])  # open and warm, as our reader's first read opens its descriptor
start = time.process_time()
total = 0
for key in keys:
    header, payload = mx.recordio.unpack(reader.read_idx(key))
    total += len(payload)
print(json.dumps({"seconds": time.process_time() - start, "bytes": total}))
"""


def faces(count: int, seed: int = 0) -> list[tuple[int, bytes]]:
    """``(identity, JPEG bytes)`` of ``count`` synthetic 112x112 faces, ``PER_IDENTITY`` per identity."""
    from datamodules.synthetic.identities import render_identity

    out = []
    for n in range(count):
        identity, sample = divmod(n, PER_IDENTITY)
        buffer = io.BytesIO()
        Image.fromarray(render_identity(identity, sample, seed)).save(buffer, format="JPEG", quality=95)
        out.append((identity, buffer.getvalue()))
    return out


def write_all(folder: Path, images: list[tuple[int, bytes]]) -> dict[str, str]:
    """The same JPEGs as an identity folder, an insightface RecordIO pack and TFRecord shards."""
    from datamodules.tfrecord import write_label_map, write_sharded
    from datamodules.faces.tfrecord import folder_classes, folder_examples

    root = folder / "faces"
    for n, (identity, data) in enumerate(images):
        path = root / f"id{identity:05d}" / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    identities = images[-1][0] + 1
    first_identity_key = len(images) + 1
    records = [(n + 1, pack_record(IRHeader(0, float(identity), n + 1, 0), data)) for n, (identity, data) in
               enumerate(images)]
    for identity in range(identities):
        keys = [n + 1 for n, (i, _) in enumerate(images) if i == identity]
        records.append((first_identity_key + identity, pack_record(IRHeader(0, [keys[0], keys[-1] + 1], 0, 0))))
    records.append((0, pack_record(IRHeader(0, [first_identity_key, first_identity_key + identities], 0, 1))))
    write_recordio(folder / "train.rec", records)
    classes, files = folder_classes(str(root))
    shards = write_sharded(folder_examples(str(root), classes, files, seed=0), str(folder / "tfr" / "faces"), 4)
    write_label_map(str(folder / "tfr" / "faces.label_map.pbtxt"), range(len(classes)), classes)
    return {"root": str(root), "rec": str(folder / "train.rec"), "shards": shards[0].replace("00000-of", "*-of"),
            "label_map": str(folder / "tfr" / "faces.label_map.pbtxt")}


# -- (a) raw reads ------------------------------------------------------------------------------------------
def read_ours(rec: str, keys: list[int]) -> float:
    """Seconds to read and unpack ``keys`` through ``IndexedRecordIO``."""
    from datamodules.recordio import _split_payload

    reader = IndexedRecordIO(rec)
    rows = reader.positions(np.asarray(keys))
    reader.read_at(int(rows[0]))  # opens the descriptor, as MXNet's reader is opened before its clock starts
    with Stopwatch() as watch:
        for row in rows.tolist():
            _split_payload(reader.read_at(row))
    return watch.cpu


def read_plain_python(rec: str, keys: list[int]) -> float:
    """Seconds for a plain Python reader of the format: ``.idx`` dict, ``seek`` + ``read`` per chunk (no checks)."""
    offsets = {}
    with open(Path(rec).with_suffix(".idx")) as f:
        for line in f:
            key, offset = line.split()
            offsets[int(key)] = int(offset)
    with open(rec, "rb") as f, Stopwatch() as watch:
        for key in keys:
            f.seek(offsets[key])
            parts = []
            while True:
                _, lrec = CHUNK_HEADER.unpack(f.read(CHUNK_HEADER.size))
                cflag, length = lrec >> 29, lrec & LENGTH_MASK
                parts.append(f.read(length))
                f.read(-length % 4)
                if cflag in (0, 3):
                    break
                parts.append(struct.pack("<I", 0xCED7230A))
            payload = b"".join(parts)
            flag = IR_HEADER.unpack_from(payload)[0]
            _ = payload[IR_HEADER.size + 4 * flag:]
    return watch.cpu


def read_mxnet(python: str, rec: str, keys: list[int]) -> float | None:
    """Seconds MXNet's ``MXIndexedRecordIO`` takes for ``keys`` (timed inside the subprocess); None if it fails."""
    result = subprocess.run([python, "-c", MXNET_READER, str(Path(rec).with_suffix(".idx")), rec, json.dumps(keys)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        print(f"MXNet reader failed: {result.stderr.strip()[-400:]}")
        return None
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


# -- (b) decode + augment ------------------------------------------------------------------------------------
def samples_per_second(dataset, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=not isinstance(
        dataset, torch.utils.data.IterableDataset), num_workers=workers, drop_last=True,
        multiprocessing_context="fork" if workers else None)
    iterator = iter(loader)
    next(iterator)  # workers started and the first batch made: the clock starts now
    count = 0
    with Stopwatch() as watch:
        for images, _ in iterator:
            count += images.shape[0]
    return count / watch.wall


def cpu_us_per_sample(name: str, dataset) -> float:
    """Process CPU time per training sample, in this process, no DataLoader (robust to other processes' load)."""
    with Stopwatch() as watch:
        if name == "tfrecord":  # an IterableDataset: its own shuffled order
            count = sum(1 for _ in dataset)
        else:
            count = len(dataset)
            for i in np.random.default_rng(0).permutation(count).tolist():
                dataset[i]
    return watch.cpu / count * 1e6


def datasets(paths: dict[str, str]) -> dict[str, object]:
    from datamodules import IdentityFolderDataModule, RecordIOFaceDataModule, TFRecordIdentityDataModule

    recordio = RecordIOFaceDataModule(rec=paths["rec"], val_bins=None, pairs="unused", num_workers=0)
    tfrecord = TFRecordIdentityDataModule(paths["shards"], paths["label_map"], pairs="unused", shuffle_buffer=1024,
                                          batch_size=BATCH, num_workers=0)
    folder = IdentityFolderDataModule(paths["root"], pairs="unused", num_workers=0)
    return {"recordio": recordio.train_dataset(), "tfrecord": tfrecord.train_dataset(),
            "folder": folder.train_dataset()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--mxnet-python", default=None, help="a Python with mxnet installed, for MXNet's reader")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        images = faces(args.images)
        paths = write_all(Path(tmp), images)
        keys = (np.random.default_rng(0).permutation(args.images) + 1).tolist()
        read_ours(paths["rec"], keys)  # warm the page cache
        raw: dict[str, list[float]] = {"ours": [], "plain_python": [], "mxnet": []}
        for _ in range(args.repeats):
            raw["ours"].append(args.images / read_ours(paths["rec"], keys))
            raw["plain_python"].append(args.images / read_plain_python(paths["rec"], keys))
            if args.mxnet_python:
                seconds = read_mxnet(args.mxnet_python, paths["rec"], keys)
                if seconds is not None:
                    raw["mxnet"].append(args.images / seconds)
        report = {"images": args.images, "raw_records_per_s": {k: statistics.median(v) for k, v in raw.items() if v}}
        sets = datasets(paths)
        decoded: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for workers in args.workers:
                for name, dataset in sets.items():
                    decoded.setdefault(f"{name}_{workers}w", []).append(samples_per_second(dataset, workers))
        report["samples_per_s"] = {k: statistics.median(v) for k, v in decoded.items()}
        cpu: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, dataset in sets.items():
                cpu.setdefault(name, []).append(cpu_us_per_sample(name, dataset))
        report["cpu_us_per_sample"] = {k: statistics.median(v) for k, v in cpu.items()}
        per_sample = report["cpu_us_per_sample"]
        report["recordio_over_folder_cpu_time"] = per_sample["recordio"] / per_sample["folder"]
        rates = report["raw_records_per_s"]
        if "mxnet" in rates:
            report["ours_over_mxnet"] = rates["ours"] / rates["mxnet"]
        report["ours_over_plain_python"] = rates["ours"] / rates["plain_python"]
        for workers in args.workers:
            s = report["samples_per_s"]
            report[f"recordio_over_folder_{workers}w"] = s[f"recordio_{workers}w"] / s[f"folder_{workers}w"]
            report[f"tfrecord_over_folder_{workers}w"] = s[f"tfrecord_{workers}w"] / s[f"folder_{workers}w"]
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
