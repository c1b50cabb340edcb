"""Callbacks the SLURM scenarios add through the scripts' EXTRA_ARGS (tests/slurm on PYTHONPATH): they hold a
training process at a known point so that a signal lands there, and say so in a marker file. They act only in the
first run of a job (SLURM_RESTART_COUNT unset or 0), so the requeued run goes straight to the end."""
from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback


def _first_run() -> bool:
    return os.environ.get("SLURM_RESTART_COUNT", "0") == "0"


def _requeue_callback(trainer):
    from nit_lightning.training.fault_tolerance import RequeueOnSignal

    return next(c for c in trainer.callbacks if isinstance(c, RequeueOnSignal))


class HoldAtStep(Callback):
    """After training step `step`, wait (up to `seconds`) until RequeueOnSignal has received a signal."""

    def __init__(self, step: int, marker: str, seconds: float = 240.0) -> None:
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.step or not _first_run():
            return
        callback = _requeue_callback(trainer)
        Path(f"{self.marker}.{trainer.global_rank}").write_text(str(trainer.global_step))
        deadline = time.time() + self.seconds
        while callback.received is None and time.time() < deadline:
            time.sleep(0.05)


class PauseAtTeardown(Callback):
    """At the end of `fit` (the last callback teardown: after RequeueOnSignal's), mark and sleep `seconds`."""

    def __init__(self, marker: str, seconds: float = 8.0) -> None:
        self.marker, self.seconds = Path(marker), seconds

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not _first_run():
            return
        Path(f"{self.marker}.{trainer.global_rank}").write_text("teardown")
        deadline = time.time() + self.seconds
        while time.time() < deadline:
            time.sleep(0.05)
