"""The one way the suite writes a file: to a temporary name beside it, then one rename. A file that exists is complete.

Temporary names are per process (`.<name>.<pid>-<random>.tmp`), so two runs that write into one folder never share a
half-written file; a collective save that several ranks write together (a sharded checkpoint) asks for the shared
name `<name>.tmp` instead. A write that fails removes its temporary file and re-raises.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_SUFFIX = ".tmp"


def temporary_path(path: str | Path, *, shared: bool = False) -> Path:
    """Where `path` is written before its rename: this process's own name, or `<name>.tmp` when ranks share it."""
    path = Path(path)
    if shared:
        return path.with_name(path.name + TMP_SUFFIX)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}{TMP_SUFFIX}")


def remove_path(path: Path) -> None:
    """Delete a file or a folder (a sharded checkpoint is a folder); nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file or folder over `path`. A folder cannot be renamed over a full folder (nor a file
    over a folder): the old one is moved to `<name>.old` first and deleted after, so `path` is never half of either."""
    if path.is_dir() or tmp.is_dir():
        old = path.with_name(path.name + ".old")
        remove_path(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, shared: bool = False) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write(tmp)`: `p` appears complete on success; on failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, shared=shared)
    remove_path(tmp)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_default(value: Any) -> Any:
    """numpy scalars and arrays, paths and dataclass-like records in JSON files."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | Path, content: Any, *, indent: int = 1, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(content, indent=indent, sort_keys=sort_keys, default=json_default))


def write_with(path: str | Path, writer: Callable[[Path], Any], *, shared: bool = False) -> Path:
    """Atomic write through any writer that takes a path (torch.save, PIL's save, np.savez, a zip file)."""
    with atomic_path(path, shared=shared) as tmp:
        writer(tmp)
    return Path(path)


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Before the work: an output file's path must not be a folder and its folder must be writable (or creatable), so
    that a long computation never ends in an error that loses its result."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'result.json'}")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {folder} is not a writable folder; choose another output path")
    return path


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file's content; a missing, unreadable or truncated file is one error naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is damaged (not valid JSON: {error}); delete it to have it made "
                         "again, or restore it") from error
