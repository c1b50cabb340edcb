"""`python -m nit_lightning fit|validate|test|predict --config experiments/<name>.yaml`: the suite's LightningCLI."""
from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nit_lightning.training.module import NiTModule

log = logging.getLogger(__name__)


def _datamodule_class() -> type:
    from nit_lightning.data.datamodule import NativeLatentDataModule

    return NativeLatentDataModule


class NiTCLI(LightningCLI):
    """LightningCLI with NiTModule + NativeLatentDataModule and the data's latent channels linked into the net."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data knows its latents' channel count (index.json) only once built, so the link runs at instantiation;
        # NiTModule then fills in net.in_channels or fails naming both values when they disagree.
        parser.link_arguments("data.latent_channels", "model.latent_channels", apply_on="instantiate")

    def before_fit(self) -> None:
        # Requeued jobs resume by themselves: pin the checkpoint dir ($NIT_CKPT_DIR or the ModelCheckpoint's) and turn
        # ckpt_path None/"last" into the newest valid checkpoint there. NIT_AUTO_RESUME=0 turns it off (docs/slurm.md).
        from nit_lightning.training.fault_tolerance import auto_resume_for_cli

        auto_resume_for_cli(self)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        seed = config.get("seed_everything")
        if seed is None or isinstance(seed, bool):
            log.warning("seed_everything=%r: this run's data order and init are not reproducible; set an int", seed)


def run_cli(argv: list[str] | None = None, **kwargs: Any) -> NiTCLI:
    """Build and run the CLI on argv (e.g. ["fit", "--config", "experiments/debug.yaml"]); returns the CLI object."""
    with warnings.catch_warnings():
        # `python -m nit_lightning fit ...` passes sys.argv on as args on purpose; Lightning warns about exactly that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return NiTCLI(NiTModule, _datamodule_class(), save_config_kwargs={"overwrite": True},
                      seed_everything_default=0, args=argv, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m nit_lightning fit|validate|test|predict ...`; 0 on success."""
    run_cli(argv)
    return 0
