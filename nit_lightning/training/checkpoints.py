"""Checkpoint files: which ones can be resumed from (header, keys, CRC), the newest valid one, atomic saves, and the
repair that keeps `last.ckpt` the newest valid state."""
from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from nit_lightning.records.files import atomic_path, commit, remove_path, temporary_path

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("state_dict", "global_step", "loops")
_STEP_IN_NAME = re.compile(r"step=(\d+)")
_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


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


def read_checkpoint_header(path: str | Path, *, weights_only: bool = True,
                           required: Sequence[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load a checkpoint memory-mapped (only the pickle is read) and check Lightning's resume keys (or `required`:
    evaluating needs weights only); returns it."""
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
    missing = [key for key in required if key not in checkpoint]
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


def _replace_with_copy(source: Path, target: Path) -> None:
    """Copy a checkpoint file or sharded folder to `target` through `<target>.tmp` and an atomic rename."""
    with atomic_path(target, shared=True) as tmp:
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, tmp)


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
        remove_path(aside)
        os.replace(path, aside)
        log.warning("moved damaged checkpoint %s aside to %s", path, aside)
    if scan.found is None or not had_last or scan.found.resolve() == last.resolve():
        return
    _replace_with_copy(scan.found, last)
    log.warning("%s was %s: replaced by a copy of %s, the newest valid checkpoint", last,
                "damaged" if last in scan.damaged else "older than it", scan.found)


def save_checkpoint_atomic(trainer: Trainer, path: str | Path) -> None:
    """trainer.save_checkpoint to `<path>.tmp` then a rename: a preempted save never leaves a half-written file. The
    temporary name is shared, not per process: a sharded save is written by every rank into one folder."""
    path = Path(path)
    tmp = temporary_path(path, shared=True)
    trainer.save_checkpoint(tmp)  # collective: every rank calls it, rank 0 writes (DDP) / all write (sharded)
    if trainer.is_global_zero:
        commit(tmp, path)
    trainer.strategy.barrier("save_checkpoint_atomic")


def checkpoint_dir_of(trainer: Trainer) -> Path:
    """Where checkpoints go: the first ModelCheckpoint's dirpath, else <default_root_dir>/checkpoints."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"
