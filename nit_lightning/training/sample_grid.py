"""Sample-grid callback: every N steps and at train end, one grid per size (fixed seeds and classes), EMA weights.

By default the sizes show what NiT is about: seen sizes and unseen ones (larger, other aspect ratios) derived from the
training data's token range, sampled with the module's recommended sampler and RoPE interpolation beyond the trained
range, exactly as `sample` would sample the checkpoint (generation/recipe.py). TensorBoard tags are
`samples/seen/<HxW>` and `samples/unseen/<HxW>` (`samples/<HxW>` when the range is unknown). For NiT-T2I the columns
are prompts (`prompts`) and every grid is labelled with them (generation/grid.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch import LightningModule, Trainer

from nit_lightning.data.codecs import Codec
from nit_lightning.data.sizes import format_size, parse_size, validate_size
from nit_lightning.diffusion.sampling import derive_seed
from nit_lightning.generation.grid import labelled_grid
from nit_lightning.generation.images import ImageRequest, generate
from nit_lightning.generation.recipe import default_grid_sizes, resolve_sampler, size_kind
from nit_lightning.generation.settings import SamplerSettings
from nit_lightning.records import SamplingRecipe
from nit_lightning.training.periodic import SamplingCallback

log = logging.getLogger(__name__)
# NiT-T2I grids when the config names no prompts: everyday scenes (a tinytext encoder counts unknown words loudly).
DEFAULT_PROMPTS = ("a photo of a cat sitting on a sofa", "a red bus on a city street at night",
                   "a bowl of fruit on a wooden table", "a mountain lake under a cloudy sky")


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


def _labelled(name: str, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """A uint8 (3, H, W) grid of one row, every image under its prompt."""
    import numpy as np

    picture = labelled_grid([(name, [image.permute(1, 2, 0).numpy() for image in images])], list(prompts))
    return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1)


class SampleGridCallback(SamplingCallback):
    """Log one grid per size to TensorBoard and optionally as PNGs.

    Image j of every grid has class classes[j] and seed derive_seed(seed, j): the grids of two steps differ only by
    the weights, and the same class shows the same noise at every size. `sizes` None: seen and unseen sizes from the
    training data's token range (`default_grid_sizes`); `sampler` None: the module's recommended sampler
    (`model.sampler`) with RoPE interpolation beyond the trained range.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        sizes: Sequence[str] | None = None,
        classes: Sequence[int] = (207, 360, 387, 974, 88, 979, 417, 279),
        seed: int = 0,
        sampler: SamplerSettings | None = None,
        codec: str | dict | Codec | None = None,
        tokens_per_forward: int = 16384,
        nrow: int | None = None,
        save_dir: str | None = None,
        at_train_end: bool = True,
        prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_train_end, codec)
        if not classes:
            raise ValueError("classes must list at least one class label (one image per class in every grid)")
        self.sizes = [parse_size(s) for s in sizes] if sizes is not None else None
        self.classes = [int(c) for c in classes]
        self.prompts = [str(p) for p in prompts] if prompts is not None else None
        if self.prompts is not None and (not self.prompts or not all(p.strip() for p in self.prompts)):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        self.seed, self.sampler, self.tokens_per_forward = int(seed), sampler, int(tokens_per_forward)
        self.nrow = int(nrow) if nrow else min(len(self.classes), 8)
        self.save_dir = Path(save_dir) if save_dir else None
        self._said_no_image_logger = False
        self._plan: tuple[list[tuple[int, int]], SamplerSettings, SamplingRecipe | None] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the codec, sizes and sampler and check every size and class now, so that a bad one fails before
        training, not at step N."""
        if stage != "fit":
            return
        self._plan = None
        sizes, sampler, recipe = self.plan(trainer, pl_module)
        multiple = self.codec(trainer).factor * int(pl_module.net.config.patch_size)
        for size in sizes:
            validate_size(size, multiple)
        if getattr(pl_module, "text", None) is None and (max(self.classes) >= pl_module.net.config.num_classes
                                                          or min(self.classes) < 0):
            raise ValueError(f"grid classes {self.classes} must lie in 0..{pl_module.net.config.num_classes - 1}")
        log.info("sample grids at %s with %s", ", ".join(self._tag(size, multiple, recipe) for size in sizes),
                 sampler.describe())

    def plan(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[tuple[int, int]], SamplerSettings,
                                                                          SamplingRecipe | None]:
        """(sizes, sampler, the module's recipe): the configured ones, else derived from the recipe (once)."""
        if self._plan is None:
            recipe = pl_module.sampling_recipe() if callable(getattr(pl_module, "sampling_recipe", None)) else None
            multiple = self.codec(trainer).factor * int(pl_module.net.config.patch_size)
            sizes = self.sizes if self.sizes is not None else default_grid_sizes(recipe, multiple)
            sampler = self.sampler if self.sampler is not None else resolve_sampler({}, recipe).sampler
            self._plan = (sizes, sampler, recipe)
        return self._plan

    def _tag(self, size: tuple[int, int], multiple: int, recipe: SamplingRecipe | None) -> str:
        """samples/seen/HxW or samples/unseen/HxW (samples/HxW when the trained range is unknown)."""
        kind = size_kind((size[0] // multiple, size[1] // multiple), recipe)
        return f"samples/{kind}/{format_size(size)}" if kind else f"samples/{format_size(size)}"

    def fire(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    @torch.no_grad()
    def generate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """{"HxW": uint8 grid (3, H', W')}; all sizes share packs, so one set of packed calls makes every grid."""
        sizes, sampler, _ = self.plan(trainer, pl_module)
        prompts = self._prompts(pl_module)
        columns = prompts if prompts is not None else self.classes
        n = len(columns)
        requests = [ImageRequest(s * n + j, size, 0 if prompts else label, derive_seed(self.seed, j),
                                 prompt=label if prompts else None)
                    for s, size in enumerate(sizes) for j, label in enumerate(columns)]
        images: dict[int, torch.Tensor] = {}
        with self.pipeline(trainer, pl_module) as pipe:
            for batch in generate(pipe, requests, sampler, tokens_per_forward=self.tokens_per_forward):
                images.update({r.index: image for r, image in zip(batch.requests, batch.images)})
        if prompts is not None:  # one row of the size, each image under its prompt
            return {format_size(size): _labelled(format_size(size), [images[s * n + j] for j in range(n)], prompts)
                    for s, size in enumerate(sizes)}
        return {format_size(size): make_grid([images[s * n + j] for j in range(n)], self.nrow)
                for s, size in enumerate(sizes)}

    def _prompts(self, pl_module: LightningModule) -> list[str] | None:
        """The grid's prompts for a NiT-T2I module (the configured ones, else DEFAULT_PROMPTS); None for NiT."""
        if getattr(pl_module, "text", None) is None:
            return None
        return self.prompts if self.prompts is not None else list(DEFAULT_PROMPTS)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        grids = self.generate(trainer, pl_module)
        _, _, recipe = self.plan(trainer, pl_module)
        multiple = self.codec(trainer).factor * int(pl_module.net.config.patch_size)
        logged = False
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, "add_image", None)):  # TensorBoard
                for name, grid in grids.items():
                    experiment.add_image(self._tag(parse_size(name), multiple, recipe), grid, global_step=step,
                                         dataformats="CHW")
                logged = True
            elif callable(getattr(logger, "log_image", None)):  # WandbLogger
                for name, grid in grids.items():
                    logger.log_image(key=self._tag(parse_size(name), multiple, recipe),
                                     images=[grid.permute(1, 2, 0).numpy()], step=step)
                logged = True
        if not logged and not self._said_no_image_logger:
            log.warning("SampleGridCallback: no logger takes images (TensorBoard, wandb); grids go to save_dir only")
            self._said_no_image_logger = True
        if self.save_dir is not None:
            from PIL import Image

            self.save_dir.mkdir(parents=True, exist_ok=True)
            for name, grid in grids.items():
                Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.save_dir / f"step{step:07d}_{name}.png")
