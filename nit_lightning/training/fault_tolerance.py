"""Fault tolerance: find the newest valid checkpoint to resume from, and stop + requeue cleanly on a signal.

A `fit` stopped by `RequeueOnSignal` ends by raising `RequeueExit` (a SystemExit), so the process exits with:
  0   stopped and requeued by `scontrol requeue` (SLURM restarts the job itself);
  75  stopped at a checkpoint but not requeued by us (not under SLURM, SIGTERM, requeue=False, or scontrol failed):
      `last.ckpt` is written, run the same command again to resume (75 = EX_TEMPFAIL of sysexits.h, "retry").
Raising (rather than `trainer.should_stop`) keeps epoch-end and train-end hooks from running after the save: they
would mark the epoch complete (ModelCheckpoint's train-end `last` save would then skip the rest of the epoch on
resume) and could start long work (sampling, evaluation) inside SLURM's 120 s grace window.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from nit_lightning import distributed

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped at a checkpoint, run again to resume
FRESH_START_ENV = "NIT_FRESH_START"  # =1: damaged checkpoints and nothing valid -> move them aside, train from step 0
REQUIRED_KEYS = ("state_dict", "global_step", "loops")
_STEP_IN_NAME = re.compile(r"step=(\d+)")
_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class RequeueExit(SystemExit):
    """Raised at a batch end after the requeue checkpoint is written; its code is the process exit code."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (truncated, bad CRC, missing keys)."""


@dataclass(frozen=True)
class Candidate:
    """One checkpoint file that might be resumed from."""

    path: Path
    global_step: int
    priority: int  # ties on global_step: 0 last*.ckpt, 1 step checkpoints, 2 Lightning's hpc_ckpt_*

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (-self.global_step, self.priority, str(self.path))


def _priority(path: Path) -> int:
    if path.name.startswith("last"):
        return 0
    return 2 if _HPC_NAME.match(path.name) else 1


def read_checkpoint_header(path: str | Path, *, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint memory-mapped (only the pickle is read) and check Lightning's resume keys; returns it."""
    path = Path(path)
    try:
        if path.is_dir():  # a sharded (FSDP/distributed) checkpoint: Lightning keeps the non-tensor part in meta.pt
            if not (path / ".metadata").is_file():
                raise CorruptCheckpointError(f"sharded checkpoint {path} has no .metadata file (unfinished save)")
            checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=weights_only)
            checkpoint.setdefault("state_dict", "sharded")  # tensors live in the .distcp files
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except CorruptCheckpointError:
        raise
    except Exception as error:  # torch raises RuntimeError/EOFError/UnpicklingError/... for a damaged file
        raise CorruptCheckpointError(f"checkpoint {path} does not load: {type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {path} lacks {missing}: it is not a resumable Lightning checkpoint")
    return checkpoint


def verify_crc(path: str | Path) -> None:
    """Read every record of a torch zip checkpoint and check its CRC-32 (torch.load itself never does)."""
    path = Path(path)
    if path.is_dir():
        return  # sharded checkpoints carry no CRC; read_checkpoint_header checked that the save finished
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CorruptCheckpointError(f"checkpoint {path} is not a readable zip: {error}") from error
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint {path}: record {bad!r} fails its CRC-32 check (corrupt bytes)")


def list_candidates(ckpt_dir: str | Path, extra_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """Every `*.ckpt` file or sharded folder in `ckpt_dir`, plus Lightning's `hpc_ckpt_*.ckpt` in `extra_dirs`.

    Sorted by path (never listdir order). Only hpc names count in `extra_dirs` (the trainer's default_root_dir is often
    the working directory): an unrelated `model.ckpt` lying there is neither resumed nor reported as damaged.
    """
    found: set[Path] = set()
    for directory, pattern in [(ckpt_dir, "*.ckpt"), *((d, "hpc_ckpt_*.ckpt") for d in extra_dirs)]:
        directory = Path(directory)
        if directory.is_dir():
            found.update(p for p in directory.glob(pattern) if p.is_file() or (p / "meta.pt").exists())
    return sorted(found)


@dataclass
class Scan:
    """What a checkpoint directory holds: the newest valid checkpoint (or None) and every damaged one seen."""

    found: Path | None = None
    damaged: dict[Path, str] = field(default_factory=dict)  # path -> why it cannot be resumed from

    def damaged_summary(self) -> str:
        """`last.ckpt (does not load: ...), step=4.ckpt (...)`: one line, each reason cut to its first sentence."""
        return ", ".join(f"{path.name} ({why.split('. ')[0][:160]})" for path, why in self.damaged.items())


def scan_checkpoints(
    ckpt_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    weights_only: bool = True,
    check_crc: bool = True,
) -> Scan:
    """Rank the candidates by the global step recorded inside; the first that is whole (CRC) is `found`.

    Each candidate is loaded memory-mapped (`weights_only` as Lightning's own resume) and must hold state_dict,
    global_step and loops; the winner's records are CRC-checked. A damaged candidate is logged, recorded in `damaged`
    and the next one is tried; ties on the step prefer last.ckpt. Candidates older than the winner are not CRC-checked.
    """
    scan = Scan()
    candidates: list[Candidate] = []
    for path in list_candidates(ckpt_dir, extra_dirs):
        try:
            header = read_checkpoint_header(path, weights_only=weights_only)
        except CorruptCheckpointError as error:
            log.warning("skipping checkpoint %s: %s", path, error)
            scan.damaged[path] = str(error).removeprefix(f"checkpoint {path} ")
            continue
        step = int(header["global_step"])
        named = _STEP_IN_NAME.search(path.name)
        if named and int(named.group(1)) != step:  # the name is only a label: the recorded step decides, loudly
            log.warning("checkpoint %s is named step=%s but records global_step=%d", path, named.group(1), step)
        candidates.append(Candidate(path, step, _priority(path)))
        del header
    for candidate in sorted(candidates, key=lambda c: c.sort_key):
        if check_crc:
            try:
                verify_crc(candidate.path)
            except CorruptCheckpointError as error:
                log.warning("skipping checkpoint %s: %s", candidate.path, error)
                scan.damaged[candidate.path] = str(error).removeprefix(f"checkpoint {candidate.path}").lstrip(": ")
                continue
        scan.found = candidate.path
        break
    return scan


def find_resume_checkpoint(
    ckpt_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    weights_only: bool = True,
    check_crc: bool = True,
) -> str | None:
    """The newest valid checkpoint in `ckpt_dir` (by the global step recorded inside), or None when there is none.

    Candidates are `last*.ckpt`, step checkpoints and Lightning's `hpc_ckpt_*.ckpt` (also looked for in
    `extra_dirs`, e.g. the trainer's default_root_dir where Lightning writes them); see `scan_checkpoints`.
    """
    found = scan_checkpoints(ckpt_dir, extra_dirs=extra_dirs, weights_only=weights_only, check_crc=check_crc).found
    return None if found is None else str(found)


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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _replace_with_copy(source: Path, target: Path) -> None:
    """Copy a checkpoint file or sharded folder to `target` through `<target>.tmp` and an atomic rename."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    _remove(tmp)
    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, tmp)
    if target.is_dir() or tmp.is_dir():  # os.replace cannot put a folder over a full folder, or a file over a folder
        _remove(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def repair_checkpoint_dir(ckpt_dir: Path, scan: Scan, last_name: str = "last.ckpt") -> None:
    """Move every damaged checkpoint aside (`<name>.corrupt`), then make `last_name` the newest valid state.

    Without this, ModelCheckpoint writes `last-v1.ckpt` beside a broken last.ckpt and `sample --ckpt …/last.ckpt`
    fails later. Run on global rank 0 only, before training: a copy of the resumed checkpoint replaces a last.ckpt that
    was damaged or older (the copy goes through `.tmp` + rename, so another rank sees the old or the new file, never
    half of one). No last.ckpt is created where there was none (a run that does not save `last`).
    """
    last = ckpt_dir / last_name
    had_last = last.exists()
    for path in scan.damaged:
        aside = path.with_name(path.name + ".corrupt")
        _remove(aside)
        os.replace(path, aside)
        log.warning("moved damaged checkpoint %s aside to %s", path, aside)
    if scan.found is None or not had_last or scan.found.resolve() == last.resolve():
        return
    _replace_with_copy(scan.found, last)
    log.warning("%s was %s: replaced by a copy of %s, the newest valid checkpoint", last,
                "damaged" if last in scan.damaged else "older than it", scan.found)


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


def checkpoint_dir_of(trainer: Trainer) -> Path:
    """Where checkpoints go: the first ModelCheckpoint's dirpath, else <default_root_dir>/checkpoints."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


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
    if os.environ.get("NIT_AUTO_RESUME", "1") == "0":
        pin_checkpoint_dir(cli.trainer, os.environ.get("NIT_CKPT_DIR") or None)
        log.info("NIT_AUTO_RESUME=0: auto-resume off, ckpt_path=%r", config.get("ckpt_path"))
        if check is not None and config.get("ckpt_path") and Path(config.get("ckpt_path")).exists():
            check(config.get("ckpt_path"))
        return config.get("ckpt_path")
    ckpt_dir = pin_checkpoint_dir(cli.trainer, os.environ.get("NIT_CKPT_DIR") or None)
    asked = config.get("ckpt_path")
    resolved = apply_auto_resume(asked, ckpt_dir, extra_dirs=[cli.trainer.default_root_dir],
                                 fresh_start=os.environ.get(FRESH_START_ENV, "0") == "1",
                                 repair=asked in (None, "last") and _is_launch_rank_zero(), check=check)
    config["ckpt_path"] = resolved
    if asked in (None, "last"):
        cli.trainer.callbacks.append(AdoptLastCheckpoint(ckpt_dir))
    return resolved


def ensure_requeue_on_signal(trainer: Trainer) -> "RequeueOnSignal":
    """Exactly one RequeueOnSignal in the trainer: the configs' own, else a default one added (logged).

    Without it Lightning's SIGTERM handler stops a `fit` mid-epoch with exit code 0 and nothing saved since the last
    periodic checkpoint. Two would each install handlers and race for the flag: refused, naming the usual cause.
    """
    found = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
    if len(found) > 1:
        raise ValueError(f"RequeueOnSignal is in the trainer's callbacks {len(found)} times: the experiment configs carry "
                         "it now, so drop --trainer.callbacks+=nit_lightning.training.fault_tolerance.RequeueOnSignal")
    if found:
        return found[0]
    callback = RequeueOnSignal()
    trainer.callbacks.append(callback)
    rank_zero_info(f"RequeueOnSignal added (the config has none): SIGUSR1/SIGTERM save last.ckpt, then exit "
                   f"{EXIT_REQUEUE} or requeue")
    return callback


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` wants: `<array job>_<task>` inside an array, else SLURM_JOB_ID."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def save_checkpoint_atomic(trainer: Trainer, path: str | Path) -> None:
    """trainer.save_checkpoint to `<path>.tmp` then os.replace: a preempted save never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp)  # collective: every rank calls it, rank 0 writes (DDP) / all write (sharded)
    if trainer.is_global_zero:
        if tmp.is_dir() and path.exists():  # sharded saves are folders: os.replace cannot overwrite a full one
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    trainer.strategy.barrier("save_checkpoint_atomic")


class RequeueOnSignal(Callback):
    """On SIGUSR1/SIGTERM: at the next batch end save last.ckpt atomically, `scontrol requeue` under SLURM, exit.

    The signal handler only sets a flag (no I/O in a handler); ranks agree on it with one boolean all-reduce every
    `check_every_n_steps` batches, so all ranks stop at the same step even if the signal reached them apart.
    Only `requeue_signals` (SIGUSR1: SLURM's time-limit warning) call `scontrol requeue`; SIGTERM saves and exits
    without it, since it comes from `scancel` (the user wants the job gone) or from preemption (SLURM requeues a job
    preempted with PreemptMode=REQUEUE itself). Lightning's own SLURM auto-requeue is switched off (logged).
    """

    def __init__(
        self,
        signals: Sequence[str] = ("SIGUSR1", "SIGTERM"),
        requeue_signals: Sequence[str] = ("SIGUSR1",),
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        requeue: bool = True,
        check_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.signals = [self._parse_signal(name) for name in signals]
        self.requeue_signals = {self._parse_signal(name) for name in requeue_signals}
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1")
        self.dirpath, self.filename, self.requeue = dirpath, filename, requeue
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None  # signal number, set by the handler
        self.stopped_at_step: int | None = None
        self.saved_path: str | None = None
        self.exit_code = EXIT_OK
        self._previous: dict[int, Any] = {}

    @staticmethod
    def _parse_signal(name: str) -> signal.Signals:
        try:
            return signal.Signals[name] if isinstance(name, str) else signal.Signals(name)
        except (KeyError, ValueError) as error:
            raise ValueError(f"unknown signal {name!r}; use names like 'SIGUSR1', 'SIGTERM'") from error

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # runs before Lightning registers its signal handlers (Trainer._run), so its SLURM handler never installs
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            # Lightning checks --nodes / --ntasks-per-node against the Trainer only for processes it launches itself;
            # under srun a mismatch (num_nodes=1 on 2 nodes) would silently plan data for the wrong world size.
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            environment.auto_requeue = False
            log.info("RequeueOnSignal: Lightning's SLURM auto_requeue switched off; this callback handles requeue")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's handlers (registered before the stage runs): ours replace them for our signals, so a
        # SIGTERM no longer raises Lightning's SIGTERMException mid-step before the checkpoint is written
        if threading.current_thread() is not threading.main_thread():
            log.warning("RequeueOnSignal: not on the main thread, cannot install signal handlers; callback inactive")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)
        log.info("RequeueOnSignal: handling %s", ", ".join(s.name for s in self.signals))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.stopped_at_step is not None or trainer.global_step % self.check_every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self._stop_for_requeue(trainer)

    def _stop_for_requeue(self, trainer: Trainer) -> None:
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = Path(self.dirpath) if self.dirpath else checkpoint_dir_of(trainer)
        path = path / self.filename
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("requeue_mkdir")
        log.warning("RequeueOnSignal: %s received; saving %s at global step %d", name, path, trainer.global_step)
        for callback in trainer.checkpoint_callbacks:
            # a ModelCheckpoint that saves `last` in the same place takes this file as its own (recorded in the
            # checkpoint), so after resume it overwrites last.ckpt instead of writing last-v1.ckpt beside it
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath and \
                    Path(callback.dirpath).resolve() == path.parent.resolve() and \
                    callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION == path.name:
                callback.last_model_path = str(Path(callback.dirpath) / path.name)
        save_checkpoint_atomic(trainer, path)
        self.saved_path, self.stopped_at_step = str(path), trainer.global_step
        result = self._requeue() if trainer.is_global_zero else None
        self.exit_code = int(trainer.strategy.broadcast(result, src=0))
        raise RequeueExit(self.exit_code)

    def _requeue(self) -> int:
        job_id = slurm_job_id()
        why = ("requeue=False" if not self.requeue else "no SLURM_JOB_ID" if job_id is None
               else None if self.received in self.requeue_signals
               else f"{signal.Signals(self.received).name if self.received else 'no signal on rank 0'} is not one of "
                    f"requeue_signals")
        if why is not None:
            log.warning("RequeueOnSignal: not requeued (%s); exit code %d: run again to resume", why, EXIT_REQUEUE)
            return EXIT_REQUEUE
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.error("RequeueOnSignal: `scontrol requeue %s` failed to run: %s; exit code %d", job_id, error,
                      EXIT_REQUEUE)
            return EXIT_REQUEUE
        if result.returncode != 0:
            log.error("RequeueOnSignal: `scontrol requeue %s` returned %d: %s; exit code %d", job_id,
                      result.returncode, result.stderr.strip(), EXIT_REQUEUE)
            return EXIT_REQUEUE
        log.warning("RequeueOnSignal: requeued SLURM job %s", job_id)
        return EXIT_OK

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()  # Lightning skips the teardown hooks when fit ends by an exception (ours included)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
