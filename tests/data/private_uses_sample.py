"""Not imported: test_layers.py's private-member scan reads it to show what it flags (and what it leaves alone)."""

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.cli import LightningCLI


class CLI(LightningCLI):
    def _parse_ckpt_path(self):  # flagged: overrides a Lightning private; and the super() call
        super()._parse_ckpt_path()

    def before_fit(self):
        self.trainer.loggers[0]._version = 3  # flagged: a Lightning private on a foreign object
        self._mine = self.trainer.fit_loop._data_fetcher  # flagged: ...; self._mine is ours


class Task:
    def total_steps(self):
        return self._trainer  # flagged: LightningModule's private, defined nowhere in this file

    def ignore(self):
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, [])  # flagged
        return self._mine, _is_local_file_protocol  # not flagged: ours; the import above is flagged
