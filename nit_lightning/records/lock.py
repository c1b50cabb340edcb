"""One run at a time per output folder: a lock file that names its holder, recognised as stale once the holder is gone.

`with folder_lock(out, "prepare"):` creates `out/.nit-lock` with O_EXCL (atomic on local and NFSv3+ filesystems) holding
{pid, host, started, command, process start time}. A second run into the same folder stops at once with one message
naming the holder and what to do. A lock whose process is dead (same host: no such pid, or the pid now belongs to a
process started later) is stale: it is removed under a takeover flock (`.nit-lock.takeover`, deleted again by its
holder, so a folder keeps no litter), and only if it is still the very lock judged stale, so a run that judged late
cannot remove the lock another run has just taken.
A lock held from another host cannot be checked from here (the message says how to remove it by hand), except the lock
of an earlier run of the same SLURM job (a requeued job may come back on another node).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".nit-lock"


class FolderBusy(RuntimeError):
    """Another live run holds the folder."""

    user_error = True  # one line for the user (cli/common.py): it names the holder and what to do


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot; Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_record(what: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what, "command": " ".join(sys.argv)[:300], "process_start": _process_start(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def is_mine(holder: dict[str, Any]) -> bool:
    """This very process (a lock left by a run that failed earlier in the same interpreter), or an earlier incarnation
    of this SLURM job (a requeued job runs once at a time: the lock of its previous run, on any node, is stale)."""
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        return True
    job = os.environ.get("SLURM_JOB_ID")
    return job is not None and holder.get("slurm_job") == job


def holder_is_alive(holder: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host; None when it is on another host (cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return False
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command', '?')})")


def _read_lock(path: Path) -> tuple[dict[str, Any] | None, bytes]:
    """The holder recorded in the lock file and the file's bytes; (None, b"") when there is none."""
    try:
        raw = path.read_bytes()
        return json.loads(raw), raw
    except FileNotFoundError:
        return None, b""
    except (OSError, ValueError):  # a lock being written this instant, or damaged: treat as held by an unknown run
        return {"pid": -1, "host": "?", "started": "?", "what": "an unknown run (unreadable lock file)"}, b"?"


def _read_holder(path: Path) -> dict[str, Any] | None:
    return _read_lock(path)[0]


def remove_stale_lock(path: Path, judged: bytes) -> bool:
    """Remove the lock at `path` if it still holds exactly the bytes judged stale. Serialised by a flock, so that of
    two runs that judged the same dead holder, the second cannot remove the lock the first has taken meanwhile (a
    plain rename-aside could: it moved whatever lock was there by then)."""
    with waiting_lock(path.with_name(f"{path.name}.takeover"), remove_after=True):
        try:
            if path.read_bytes() != judged:
                return False  # gone, or another run's lock by now: judged again on the next try
        except FileNotFoundError:
            return False
        path.unlink()
        return True


def acquire(folder: str | Path, what: str) -> Path:
    """Take `folder`'s lock for this process (creating the folder); FolderBusy when a live run holds it."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    record = json.dumps(holder_record(what), indent=1).encode()
    for _ in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder, raw = _read_lock(path)
            if holder is None:
                continue  # released between our two calls: try again
            alive = False if is_mine(holder) else holder_is_alive(holder)
            if alive is False:
                if remove_stale_lock(path, raw):
                    log.warning("%s: removed the stale lock of %s, whose process is gone", folder, _describe(holder))
                continue
            where = ("" if alive else f" on another host; if that run is gone, delete {path}")
            raise FolderBusy(f"{folder} is in use by {_describe(holder)}{where}: two runs writing one folder would "
                             "mix their files; wait for it to finish, stop it, or use another output folder")
        except OSError as error:  # a read-only file system or folder: found before any work, not after it
            raise PermissionError(f"cannot write in the output folder {folder} ({error.strerror}); choose a folder "
                                  "you can write to") from error
        with os.fdopen(fd, "wb") as handle:
            handle.write(record)
        return path
    raise FolderBusy(f"{folder}: could not take its lock {path} (other runs keep taking it); retry, or use another "
                     "output folder")


def release(folder: str | Path) -> None:
    """Drop this process's lock (a lock of another process is left alone)."""
    path = Path(folder) / LOCK_NAME
    holder = _read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock for the block (`enabled=False`: ranks other than the one that holds it for the run)."""
    if not enabled:
        yield
        return
    acquire(folder, what)
    try:
        yield
    finally:
        release(folder)


@contextlib.contextmanager
def waiting_lock(path: str | Path, *, remove_after: bool = False) -> Iterator[None]:
    """An exclusive lock on `path` held for the block, waiting for it (flock: the kernel releases it if the holder
    dies). For short read-merge-write sections that concurrent runs share on purpose (array tasks adding rows to one
    table), where `folder_lock` would refuse the second run.

    `remove_after`: the lock file is deleted when the block ends (no litter in a folder the user lists). Safe because
    a waiter, once it has the flock, checks that the file it locked is still the one at `path`; one deleted meanwhile
    is let go for the current file (the usual open, flock, compare-inodes loop)."""
    path = Path(path)
    while True:
        with open(path, "a") as handle:  # closing drops the flock
            fcntl.flock(handle, fcntl.LOCK_EX)
            if remove_after and not _still_at(path, handle.fileno()):
                continue  # the previous holder deleted the file we waited on: lock the current one
            try:
                yield
            finally:
                if remove_after:
                    path.unlink(missing_ok=True)  # before the flock drops, so no one can lock this file after it
            return


def _still_at(path: Path, fd: int) -> bool:
    """Whether the open file `fd` is the file now at `path` (not deleted or replaced since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:  # gone (ENOENT), or deleted by another NFS client (ESTALE): not the current file
        return False
