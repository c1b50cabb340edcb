"""Callbacks that work every N optimiser steps, and the base of those that sample with the EMA weights meanwhile."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from lightning.pytorch import Callback, LightningModule, Trainer

from nit_lightning.data.codecs import Codec, codec_description_of, resolve_codec
from nit_lightning.generation.pipeline import Pipeline

log = logging.getLogger(__name__)


class EveryNStepsCallback(Callback):
    """Calls `self.fire(trainer, pl_module)` at optimiser steps N, 2N, … and at train end (each step at most once)."""

    def __init__(self, every_n_steps: int, at_train_end: bool = True) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
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


class SamplingCallback(EveryNStepsCallback):
    """An every-N-steps callback that samples: the codec comes from the datamodule, the EMA weights are swapped in."""

    def __init__(self, every_n_steps: int, at_train_end: bool = True, codec: str | dict | Codec | None = None) -> None:
        super().__init__(every_n_steps, at_train_end)
        self.codec_arg = codec
        self._codec: Codec | None = None
        self._said_live = False

    def codec(self, trainer: Trainer) -> Codec:
        """The codec given to the callback, else the one recorded in the datamodule's shards (resolved once)."""
        if self._codec is None:
            description = codec_description_of(getattr(trainer, "datamodule", None))
            self._codec = resolve_codec(self.codec_arg, description, fallback_name="datamodule", missing=(
                f"{type(self).__name__} needs a codec to decode latents: pass codec='pixel:F' / 'dcae:PATH' / "
                "'tinyae:PATH' or use a datamodule whose shards record theirs (NativeLatentDataModule)"))[0]
        return self._codec

    @contextlib.contextmanager
    def pipeline(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[Pipeline]:
        """The net in eval mode with the EMA weights swapped in (live weights, with a warning, when there is no EMA)."""
        net = pl_module.net
        was_training = net.training
        net.eval()
        try:
            with self._ema_weights(trainer, pl_module):
                text = getattr(pl_module, "text", None)  # NiT-T2I: the module's frozen text encoder
                yield Pipeline(net=net, codec=self.codec(trainer), text_encoder=text.encoder if text else None)
        finally:
            net.train(was_training)

    def _ema_weights(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "swapped_in", None)):
                return cb.swapped_in(pl_module)
        if not self._said_live:
            log.warning("%s: no EMA callback with swapped_in(); sampling with the live weights", type(self).__name__)
            self._said_live = True
        return contextlib.nullcontext()
