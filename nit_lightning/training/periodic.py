"""A callback that does its work every N optimiser steps and once more at the end of training."""
from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class EveryNStepsCallback(Callback):
    """Calls `self.fire(trainer, pl_module)` at optimiser steps N, 2N, … and at train end (each step at most once)."""

    def __init__(self, every_n_steps: int, at_train_end: bool = True) -> None:
        self.every_n_steps, self.at_train_end = int(every_n_steps), bool(at_train_end)
        self._last_step = -1

    def fire(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimiser steps: with gradient accumulation several batches share one, so remember it.
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.fire(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.fire(trainer, pl_module)
