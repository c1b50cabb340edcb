"""`python -m nit_lightning fit|validate|test|predict --config experiments/<name>.yaml`: the suite's LightningCLI.

Exit codes: 0 done; 2 a user error, printed as one line `python -m nit_lightning <command>: error: <message>`
(NIT_TRACEBACK=1 shows the traceback); 75 stopped by a signal after saving last.ckpt (RequeueOnSignal, docs/slurm.md);
130 Ctrl-C (during training after saving last.ckpt); 143 SIGTERM outside training (setup, or validate/test/predict:
nothing to save); 1 any other failure, with its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nit_lightning.cli.common import is_user_error, user_error_line
from nit_lightning.cli.config_errors import NiTArgumentParser
from nit_lightning.training.module import NiTModule

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM: Lightning's handler stopped the run before RequeueOnSignal took over


def _datamodule_class() -> type:
    from nit_lightning.data.datamodule import NativeLatentDataModule

    return NativeLatentDataModule


class NiTCLI(LightningCLI):
    """LightningCLI with NiTModule + NativeLatentDataModule and the data's latent channels linked into the net; keys
    are never abbreviated and config mistakes are one line naming the nearest key (cli/config_errors.py)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else ["--config"]
        NiTArgumentParser.config_given = any(a in ("--config", "-c") or a.startswith("--config=") for a in given)
        NiTArgumentParser.command = f"python -m nit_lightning {given[0] if given and given[0] in self.subcommands() else ''}".rstrip()
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data knows its latents' channel count (index.json) only once built, so the link runs at instantiation;
        # NiTModule then fills in net.in_channels or fails naming both values when they disagree.
        parser.link_arguments("data.latent_channels", "model.latent_channels", apply_on="instantiate")

    def _run_subcommand(self, subcommand: str) -> None:
        # rank 0 returns only when the ranks it launched itself have (training/launched_ranks.py)
        from nit_lightning.training.launched_ranks import AFTER_FAILURE_S, AFTER_SUCCESS_S, wait_for_launched_ranks

        try:
            super()._run_subcommand(subcommand)
        except BaseException as stop:  # SystemExit: RequeueOnSignal's stop, every rank saved and is leaving
            wait_for_launched_ranks(self.trainer, AFTER_SUCCESS_S if isinstance(stop, SystemExit) else AFTER_FAILURE_S)
            raise
        wait_for_launched_ranks(self.trainer, AFTER_SUCCESS_S)

    def _subconfig(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def before_fit(self) -> None:
        # Requeued jobs resume by themselves: pin the checkpoint dir ($NIT_CKPT_DIR or the ModelCheckpoint's) and turn
        # ckpt_path None/"last" into the newest valid checkpoint there. NIT_AUTO_RESUME=0 turns it off (docs/slurm.md).
        # A stop by signal saves last.ckpt and exits 75 (or requeues): one RequeueOnSignal, the config's or a default.
        from nit_lightning.training.auto_resume import auto_resume_for_cli
        from nit_lightning.training.fault_tolerance import ensure_requeue_on_signal

        # A resume continues the run that wrote the checkpoint: refuse another net or model settings (before the
        # checkpoint directory is touched), warn on other data or a finished run (training/provenance.py). Every
        # checkpoint records the data it was trained on (the datamodule's provenance, in nit_meta).
        from nit_lightning.training.provenance import check_resume

        ensure_requeue_on_signal(self.trainer)
        auto_resume_for_cli(self, check=lambda path: check_resume(path, self.model, self.datamodule.provenance(),
                                                                  self.trainer.max_steps))

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the config's model by the --ckpt_path's hyper-parameters, silently dropping `--model.*`.

        `fit` keeps the config's model, and `before_fit` refuses a checkpoint trained with other settings; validate,
        test and predict keep Lightning's rule (they evaluate the checkpoint's model) and say which values it replaced.
        """
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            return
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            from nit_lightning.training.checkpoints import read_checkpoint_header
            from nit_lightning.training.provenance import describe, differences, saved_hparams

            # a truncated or damaged file: one line, before Lightning reads it (evaluating needs the weights only)
            read_checkpoint_header(ckpt_path, required=("state_dict",))

            replaced = differences(saved_hparams(ckpt_path), self.config[subcommand].get("model") or {},
                                   skip=frozenset({"latent_channels", "_instantiator", "_class_path"}))
            if replaced:
                log.warning("%s: the model is built from %s's hyper-parameters, which replace the config's %s",
                            subcommand, ckpt_path, describe(replaced, "model."))
        super()._parse_ckpt_path()

    def after_fit(self) -> None:
        # Lightning logs "No training batches" and returns: without this, an empty dataset exits 0 with no checkpoint.
        if self.trainer.num_training_batches == 0:
            data = self._subconfig().get("data") or {}
            plan = getattr(self.datamodule, "plan_report", None) if self.datamodule is not None else None
            counts = "" if not plan else (f" ({plan.get('selected_samples', '?')} samples in "
                                          f"{plan.get('planned_packs', '?')} packs)")
            raise ValueError(
                f"fit trained nothing: the training data gave no packs{counts}; data.sources="
                f"{data.get('sources')!r}, tokens_per_pack={data.get('tokens_per_pack')}. Point --data.sources at "
                "shards written by `prepare` (their index.json lists the samples)"
            )

    def _require_weights(self) -> None:
        config = self._subconfig()
        if not config.get("ckpt_path") and not (config.get("model") or {}).get("init_from"):
            raise ValueError(f"`{self.subcommand}` needs --ckpt_path (the checkpoint whose EMA weights to evaluate) or "
                             "--model.init_from (official weights); without either the model has random weights")


    def before_validate(self) -> None:
        self._require_weights()

    def before_test(self) -> None:
        self._require_weights()

    def before_predict(self) -> None:
        self._require_weights()

    def after_validate(self) -> None:
        if sum(self.trainer.num_val_batches or [0]) == 0:
            raise ValueError("validate evaluated nothing: set --data.val_sources (shard directories of the validation "
                             "split, prepared like the training data) to sources that hold samples")

    def before_instantiate_classes(self) -> None:
        seed = self._subconfig().get("seed_everything")
        if seed is None or isinstance(seed, bool):
            log.warning("seed_everything=%r: this run's data order and init are not reproducible; set an int", seed)
        require_the_accelerator((self._subconfig().get("trainer") or {}).get("accelerator"))


def require_the_accelerator(accelerator: Any) -> None:
    """A GPU config on a machine without CUDA ends in Lightning's "No supported gpu backend found!": say what to do."""
    import torch

    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: add --trainer.accelerator "
                         "cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true, or start from "
                         "experiments/debug.yaml (a CPU config)")


def run_cli(argv: list[str] | None = None, **kwargs: Any) -> NiTCLI:
    """Build and run the CLI on argv (e.g. ["fit", "--config", "experiments/debug.yaml"]); returns the CLI object."""
    with warnings.catch_warnings():
        # `python -m nit_lightning fit ...` passes sys.argv on as args on purpose; Lightning warns about exactly that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        kwargs.setdefault("parser_class", NiTArgumentParser)
        return NiTCLI(NiTModule, _datamodule_class(), save_config_kwargs={"overwrite": True},
                      seed_everything_default=0, args=argv, **kwargs)


def _user_errors() -> tuple[type[BaseException], ...]:
    from nit_lightning.training.checkpoints import CorruptCheckpointError

    # MisconfigurationException: Lightning's "this Trainer setup cannot work" (two progress bars, a bad device count)
    return (CorruptCheckpointError, MisconfigurationException)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m nit_lightning fit|validate|test|predict ...`: 0 on success, see the module doc."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"python -m nit_lightning {argv[0] if argv and not argv[0].startswith('-') else ''}".rstrip()
    try:
        run_cli(argv)
    except SIGTERMException:
        print(f"{prog}: stopped by SIGTERM outside training (setup, validation, test, predict); nothing was saved",
              file=sys.stderr)
        return EXIT_SIGTERM
    except Exception as error:
        if not is_user_error(error, _user_errors()) or os.environ.get("NIT_TRACEBACK"):
            raise
        print(user_error_line(prog, error), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
