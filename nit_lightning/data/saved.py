"""Small model files of the suite (tinyae codec, tiny text encoder, demo classifiers): a dict of plain values and
tensors, written atomically, read without pickle, refused with one clear error when it is not what the caller expects."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from nit_lightning.records import write_with


def save_payload(out: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: a file that exists is complete."""
    write_with(out, lambda tmp: torch.save(payload, tmp))


def load_payload(path: str | Path, *, kind: str, version_key: str, version: int, what: str, how_to_make: str,
                 unversioned: int | None = None) -> dict[str, Any]:
    """The dict of a file written by `save_payload` with payload["kind"] == kind and the expected format version
    (`unversioned`: the version of files written before the key existed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} not found; make one with `{how_to_make}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a text file, a truncated file, a pickle that is not plain tensors
        raise ValueError(f"{str(path)!r} is not a {what} file (torch.load failed: {type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{str(path)!r} is not a {what} file (kind {found!r}, expected {kind!r})")
    found_version = payload.get(version_key, unversioned)
    if found_version != version:
        raise ValueError(f"{str(path)!r} is a {what} of format version {found_version}, this code reads "
                         f"version {version}: make it again with `{how_to_make}`")
    return payload


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (which weights a description or a feature name refers to)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_sha256(root: str | Path, names: list[str], chunk: int = 1 << 24) -> str:
    """sha256 over (name, bytes) of several files of a folder in sorted name order, read in chunks (model folders hold
    gigabytes of weights): which model folder a description refers to."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(Path(root) / name, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()
