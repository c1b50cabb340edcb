"""One `fit` per checkpoint directory: global rank 0 holds the directory's lock (records/lock.py) from before the
auto-resume touches it until training ends, also on failure or a signal. Two runs into one directory used to both
exit 0, leaving `step=50.ckpt` (one run) beside `step=50-v1.ckpt` (the other) and `last.ckpt` beside `last-v1.ckpt`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from nit_lightning.records.lock import acquire, release


class RunFolderLock(Callback):
    """Releases the lock `lock_run_folder` took, when fit ends (teardown) or fails (on_exception)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        release(self.folder)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        release(self.folder)

    def state_dict(self) -> dict[str, Any]:
        return {}


def lock_run_folder(trainer: Trainer, folder: Path, *, enabled: bool = True) -> None:
    """Take `folder`'s lock (on global rank 0: `enabled`) and release it with the fit; FolderBusy names the holder."""
    if not enabled:
        return
    acquire(folder, "fit")
    trainer.callbacks.append(RunFolderLock(folder))
