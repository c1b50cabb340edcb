"""A callback that makes every training step take a while: a test's signals then land inside a known step."""
from __future__ import annotations

import time

from lightning.pytorch import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
