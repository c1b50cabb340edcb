"""Sample-grid callback: every N steps and at train end, one grid per size (fixed seeds and classes), EMA weights."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch import LightningModule, Trainer

from nit_lightning.training.periodic import EveryNStepsCallback
from nit_lightning.data.codecs import Codec, resolve_codec
from nit_lightning.data.sizes import format_size, parse_interval, parse_size, validate_size
from nit_lightning.diffusion.sampling import SampleRequest, derive_seed, plan_sample_packs, sample_pack
from nit_lightning.generation.pipeline import Pipeline

log = logging.getLogger(__name__)


def make_grid(images: Sequence[torch.Tensor], nrow: int, padding: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) images of one size -> one (3, rows·(H+p)+p, nrow·(W+p)+p) uint8 grid on black."""
    _, h, w = images[0].shape
    rows = (len(images) + nrow - 1) // nrow
    grid = torch.zeros(3, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return grid


class SampleGridCallback(EveryNStepsCallback):
    """Log one grid per configured size (sizes unseen in training welcome) to TensorBoard and optionally as PNGs."""

    def __init__(
        self,
        every_n_steps: int = 1000,
        sizes: Sequence[str | Sequence[int]] = ("256x256",),
        classes: Sequence[int] = (207, 360, 387, 974, 88, 979, 417, 279),
        seed: int = 0,
        method: str = "euler",
        steps: int = 50,
        cfg_scale: float = 1.0,
        cfg_interval: str | Sequence[float] = (0.0, 1.0),
        codec: str | dict | Codec | None = None,
        tokens_per_pack: int = 16384,
        nrow: int | None = None,
        save_dir: str | None = None,
        at_train_end: bool = True,
        precision: str = "fp32",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not classes:
            raise ValueError("classes must list at least one class label (one image per class in every grid)")
        self.every_n_steps = int(every_n_steps)
        self.sizes = [parse_size(s) for s in sizes]
        self.classes = [int(c) for c in classes]
        self.seed, self.method, self.steps = int(seed), method, int(steps)
        self.cfg_scale, self.cfg_interval = float(cfg_scale), parse_interval(cfg_interval)
        self.codec_arg = codec
        self.tokens_per_pack = int(tokens_per_pack)
        self.nrow = int(nrow) if nrow else min(len(self.classes), 8)
        self.save_dir = Path(save_dir) if save_dir else None
        self.at_train_end, self.precision = at_train_end, precision
        self._codec: Codec | None = None
        self._last_step = -1
        self._said_live = False
        self._said_no_image_logger = False

    # ---- setup ----------------------------------------------------------------------------------------------
    def _resolve_codec(self, trainer: Trainer) -> Codec:
        description = getattr(getattr(trainer, "datamodule", None), "codec_description", None)
        return resolve_codec(self.codec_arg, description, fallback_name="datamodule", missing=(
            "SampleGridCallback needs a codec to decode latents: pass codec='pixel:F' / 'dcae:PATH' or use a "
            "datamodule with `codec_description`"))[0]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the codec and check every size now, so a bad size fails before training, not at step N."""
        if stage != "fit":
            return
        self._codec = self._resolve_codec(trainer)
        multiple = self._codec.factor * int(pl_module.net.config.patch_size)
        for size in self.sizes:
            validate_size(size, multiple)
        if max(self.classes) >= pl_module.net.config.num_classes or min(self.classes) < 0:
            raise ValueError(f"grid classes {self.classes} must lie in 0..{pl_module.net.config.num_classes - 1}")

    # ---- hooks ----------------------------------------------------------------------------------------------
    def fire(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    # ---- work -----------------------------------------------------------------------------------------------
    def _weights(self, trainer: Trainer, pl_module: LightningModule):
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "swapped_in", None)):
                return cb.swapped_in(pl_module)
        if not self._said_live:
            log.warning("SampleGridCallback: no EMA callback with swapped_in(); sampling grids with the live weights")
            self._said_live = True
        return contextlib.nullcontext()

    @torch.no_grad()
    def generate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """{"HxW": uint8 grid (3, H', W')}; all sizes share packs, so one set of packed calls makes every grid."""
        net = pl_module.net
        codec = self._codec or self._resolve_codec(trainer)
        device = next(net.parameters()).device
        m = codec.factor * int(net.config.patch_size)
        for size in self.sizes:
            validate_size(size, m)
        requests = [
            SampleRequest(s * len(self.classes) + j, (h // m, w // m), label, derive_seed(self.seed, j))
            for s, (h, w) in enumerate(self.sizes)
            for j, label in enumerate(self.classes)
        ]
        packs = plan_sample_packs(requests, self.tokens_per_pack, cfg=self.cfg_scale != 1.0)
        images: dict[int, torch.Tensor] = {}
        was_training = net.training
        net.eval()
        try:
            with self._weights(trainer, pl_module):
                gen = Pipeline(net=net, codec=codec)
                for pack in packs:
                    x = sample_pack(gen.model_fn(self.precision), pack, gen.token_dim, device=device, method=self.method,
                                    steps=self.steps, cfg_scale=self.cfg_scale, cfg_interval=self.cfg_interval,
                                    null_class=net.null_class)
                    hw = torch.tensor([list(r.hw) for r in pack])
                    images.update({r.index: im for r, im in zip(pack, gen.decode(x, hw))})
        finally:
            net.train(was_training)
        n = len(self.classes)
        return {
            format_size(size): make_grid([images[s * n + j] for j in range(n)], self.nrow)
            for s, size in enumerate(self.sizes)
        }

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        grids = self.generate(trainer, pl_module)
        logged = False
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):
                for name, grid in grids.items():
                    experiment.add_image(f"samples/{name}", grid, global_step=step, dataformats="CHW")
                logged = True
        if not logged and not self._said_no_image_logger:
            log.warning("SampleGridCallback: no logger with add_image (TensorBoard); grids go to save_dir only")
            self._said_no_image_logger = True
        if self.save_dir is not None:
            from PIL import Image

            self.save_dir.mkdir(parents=True, exist_ok=True)
            for name, grid in grids.items():
                Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.save_dir / f"step{step:07d}_{name}.png")
