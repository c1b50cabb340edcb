"""Auto-resume: a requeued or rerun `fit` continues from the newest valid checkpoint of its own directory.

`auto_resume_for_cli` (the LightningCLI's before_fit) pins the checkpoint directory, resolves `ckpt_path` (explicit >
newest valid > fresh), refuses a directory of only damaged checkpoints unless NIT_FRESH_START=1, and keeps last.ckpt
the newest valid state. NIT_AUTO_RESUME=0 turns it off.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from nit_lightning import distributed
from nit_lightning.training.checkpoints import (
    CorruptCheckpointError,
    checkpoint_dir_of,
    repair_checkpoint_dir,
    scan_checkpoints,
)
from nit_lightning.training.run_lock import lock_run_folder

log = logging.getLogger(__name__)

FRESH_START_ENV = "NIT_FRESH_START"  # =1: damaged checkpoints and nothing valid -> move them aside, train from step 0


def apply_auto_resume(
    ckpt_path_arg: str | None,
    ckpt_dir: str | Path | None,
    *,
    extra_dirs: Sequence[str | Path] = (),
    fresh_start: bool = False,
    repair: bool = False,
    check: Callable[[str], None] | None = None,
) -> str | None:
    """The ckpt_path to pass to `trainer.fit`: an explicit path wins; "last" or None resolve to the newest valid one.

    None with an empty or missing `ckpt_dir` starts from scratch (returns None). "last" with nothing valid is an error:
    the user asked to resume and nothing can be resumed. Damaged checkpoints and nothing valid is an error too (a
    silent restart from step 0 would throw the run away) unless `fresh_start` (NIT_FRESH_START=1) says to start anew.
    `repair` (rank 0 only) then makes the directory consistent: damaged files are moved aside as `<name>.corrupt`,
    and a last.ckpt that is not the newest valid state is replaced by a copy of the checkpoint resumed from.
    `check(path)` runs on the checkpoint found (or given) before anything is repaired: it may refuse by raising.
    """
    if ckpt_path_arg not in (None, "last"):
        if not Path(ckpt_path_arg).exists() and ckpt_path_arg not in ("best", "hpc"):
            raise FileNotFoundError(f"--ckpt_path {ckpt_path_arg!r} does not exist; pass an existing file or 'last'")
        if check is not None and Path(ckpt_path_arg).exists():
            check(ckpt_path_arg)
        return ckpt_path_arg
    if ckpt_dir is None:
        if ckpt_path_arg == "last":
            raise ValueError("--ckpt_path last needs a checkpoint directory (ModelCheckpoint dirpath); none is set")
        return None
    scan = scan_checkpoints(ckpt_dir, extra_dirs=extra_dirs)
    if scan.found is None and ckpt_path_arg == "last":
        damaged = f" (damaged: {scan.damaged_summary()})" if scan.damaged else ""
        raise FileNotFoundError(f"--ckpt_path last: no valid checkpoint in {ckpt_dir}{damaged}; drop the flag to "
                                "start anew")
    if scan.found is None and scan.damaged and not fresh_start:
        raise CorruptCheckpointError(
            f"auto-resume: every checkpoint in {ckpt_dir} is damaged: {scan.damaged_summary()}. Nothing was resumed "
            f"and nothing was changed. Restore a good copy, or set {FRESH_START_ENV}=1 to train from step 0 (the "
            "damaged files are then moved aside as <name>.corrupt)"
        )
    if check is not None and scan.found is not None:
        check(str(scan.found))
    if repair:
        repair_checkpoint_dir(Path(ckpt_dir), scan)
    if scan.found is None:
        how = "" if not scan.damaged else f" ({FRESH_START_ENV}=1: damaged ones moved aside)"
        rank_zero_info(f"auto-resume: no checkpoint in {ckpt_dir}, starting from scratch{how}")
        return None
    rank_zero_info(f"auto-resume: resuming from {scan.found}")
    return str(scan.found)


class AdoptLastCheckpoint(Callback):
    """ModelCheckpoints that save `last` into `dirpath` take an existing last.ckpt there as their own at train start.

    Lightning restores `last_model_path` from the checkpoint resumed from; when that is not last.ckpt (a step
    checkpoint, an hpc save, a fresh start after damaged files were moved aside) its next `last` save would go to
    `last-v1.ckpt` and leave last.ckpt stale. Added by `auto_resume_for_cli`.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath):
                continue
            last = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
            if Path(callback.dirpath).resolve() == self.dirpath.resolve() and os.path.exists(last):
                callback.last_model_path = last


def pin_checkpoint_dir(trainer: Trainer, override: str | None = None) -> Path:
    """Fix the run's checkpoint directory (the first ModelCheckpoint's dirpath) and return it.

    `override` (the CLI passes $NIT_CKPT_DIR, which the sbatch scripts set) replaces the first ModelCheckpoint's
    dirpath; a ModelCheckpoint without a dirpath gets `<default_root_dir>/checkpoints`: Lightning's own default
    (`<root>/<logger>/version_N/checkpoints`) moves to a new version on every restart, so a requeued job would never
    find its checkpoints again. Both changes are logged.
    """
    first = True
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if first and override:
            log.info("ModelCheckpoint dirpath %s -> %s (NIT_CKPT_DIR)", callback.dirpath, override)
            callback.dirpath = os.path.realpath(os.path.expanduser(override))
        elif not callback.dirpath:
            callback.dirpath = str(Path(trainer.default_root_dir).resolve() / "checkpoints")
            log.info("ModelCheckpoint dirpath pinned to %s (stable across restarts)", callback.dirpath)
        first = False
    if first and override:
        raise ValueError(f"NIT_CKPT_DIR={override!r} is set but the trainer has no ModelCheckpoint to point at it")
    return checkpoint_dir_of(trainer)


def _is_launch_rank_zero() -> bool:
    """Global rank 0 before torch.distributed exists: torchrun/srun variables, or no LOCAL_RANK/NODE_RANK of a child
    that Lightning's own launcher started (it sets those, not RANK)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return False
    return distributed.from_environment().is_main


def auto_resume_for_cli(cli: Any, check: Callable[[str], None] | None = None) -> str | None:
    """LightningCLI `before_fit` hook: pin the checkpoint dir and put the resolved `ckpt_path` into the fit config.

    Off when the environment sets NIT_AUTO_RESUME=0 (then `--ckpt_path` is used as given, NIT_CKPT_DIR still applies).
    NIT_FRESH_START=1 lets a directory whose checkpoints are all damaged start from step 0 (see `apply_auto_resume`).
    `check(path)` vets the checkpoint to resume from before the directory is repaired (the CLI: provenance checks).
    """
    config = cli.config_init["fit"] if "fit" in cli.config_init else cli.config_init
    ckpt_dir = pin_checkpoint_dir(cli.trainer, os.environ.get("NIT_CKPT_DIR") or None)
    # One fit per checkpoint directory, held from here (before anything in it is repaired) to the end of the fit.
    lock_run_folder(cli.trainer, ckpt_dir, enabled=_is_launch_rank_zero())
    if os.environ.get("NIT_AUTO_RESUME", "1") == "0":
        log.info("NIT_AUTO_RESUME=0: auto-resume off, ckpt_path=%r", config.get("ckpt_path"))
        if check is not None and config.get("ckpt_path") and Path(config.get("ckpt_path")).exists():
            check(config.get("ckpt_path"))
        return config.get("ckpt_path")
    asked = config.get("ckpt_path")
    resolved = apply_auto_resume(asked, ckpt_dir, extra_dirs=[cli.trainer.default_root_dir],
                                 fresh_start=os.environ.get(FRESH_START_ENV, "0") == "1",
                                 repair=asked in (None, "last") and _is_launch_rank_zero(), check=check)
    config["ckpt_path"] = resolved
    if asked in (None, "last"):
        cli.trainer.callbacks.append(AdoptLastCheckpoint(ckpt_dir))
    return resolved
