"""Worker-to-trainer transfer of batches: small tensors pickled (datamodules/transfer.py) vs one shared-memory
segment per tensor (torch's default), measured alternately in one run.

The shapes detection DataModule's training loader (16 images of 64 px, ~160 small target tensors per batch) with
``--workers`` workers, against the same loader without the packing, and the in-process loader (0 workers) as the
cost of building the batches. Prints ms per batch and the ratio packed / default (target: well below 1, close to
the in-process cost).

    python benchmarks/loader_transfer.py [--batches 30] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from timing import Stopwatch  # noqa: E402  (benchmarks/ is on the path when a script runs)

from datamodules import ShapesDetectionDataModule
from datamodules.loaders import TransferDataLoader
from datamodules.transfer import PackSmall


def ms_per_batch(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # workers started, first batch in
    with Stopwatch() as watch:
        for _ in range(batches):
            next(iterator)
    return watch.wall / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dm = ShapesDetectionDataModule(num_train=4000, num_val=16, image_size=64, batch_size=16, num_workers=0)
    dm.setup("fit")
    dataset, collate = dm.train_dataloader().dataset, dm.collate_fn

    def loader(workers: int, packed: bool) -> TransferDataLoader:
        return TransferDataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers,
                                  collate_fn=PackSmall(collate) if packed else collate,
                                  generator=torch.Generator().manual_seed(0))

    times: dict[str, list[float]] = {"packed": [], "default": [], "in-process": []}
    for _ in range(args.repeats):
        times["packed"].append(ms_per_batch(loader(args.workers, True), args.batches))
        times["default"].append(ms_per_batch(loader(args.workers, False), args.batches))
        times["in-process"].append(ms_per_batch(loader(0, False), args.batches))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"load average {os.getloadavg()}; {args.workers} worker(s), 16 x 64-px shapes per batch, median of "
          f"{args.repeats} x {args.batches} batches")
    for name, value in median.items():
        print(f"{name:12} {value:8.1f} ms/batch")
    print(f"packed / default: {median['packed'] / median['default']:.2f}")


if __name__ == "__main__":
    main()
