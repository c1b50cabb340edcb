"""The latent shard format: WebDataset tars of (C, h, w) latents, a sidecar JSON per shard, an index per directory.

One sample per source image, members sharing the key `<key>`:
  <key>.latent.npy       (C, h, w) float16, or bfloat16 stored as uint16 bits (meta "dtype": "bfloat16")
  <key>.latent_flip.npy  optional: the latent of the horizontally mirrored image, same shape and dtype
  <key>.cls              class index as ASCII (the WebDataset convention)
  <key>.json             {"cls", "orig_size": [H, W], "latent_hw": [h, w], "source", "dtype", "mode"}, and "caption"
                         (text) in the shards of a captioned folder (index.json "captions": "beside" | "manifest")
Beside every `<prefix>-%06d.tar` a `<prefix>-%06d.json` sidecar lists the shard's keys and token lengths (h·w), so a
packer can plan packs from lengths alone. `index.json` merges the sidecars and adds the settings of the run.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nit_lightning.records.files import commit, read_json, temporary_path, write_json

INDEX_NAME = "index.json"
LATENT_DTYPES = ("float16", "bfloat16")


@dataclass
class LatentSample:
    """One decoded shard sample."""

    key: str
    latent: torch.Tensor  # (C, h, w) in the stored dtype
    latent_flip: torch.Tensor | None
    cls: int
    meta: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.latent.shape[-2] * self.latent.shape[-1])

    @property
    def caption(self) -> str | None:
        """The image's caption (a captioned folder's `prepare --captions`), None in class-conditional shards."""
        return self.meta.get("caption")


class ShardFormatError(ValueError):
    """A shard or sample that does not follow the format above."""


def encode_latent(latent: torch.Tensor, dtype: str) -> bytes:
    """(C, h, w) tensor -> .npy bytes in the storage dtype."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype {dtype!r} is not one of {LATENT_DTYPES}")
    latent = latent.detach().cpu()
    if dtype == "float16":
        array = latent.to(torch.float16).numpy()
    else:  # numpy has no bfloat16: keep the raw 16 bits
        array = latent.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_npy(data: bytes) -> np.ndarray:
    """Parse .npy bytes with one header read and a zero-copy view (np.load costs ~0.5 ms a sample in the loader)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except ValueError as error:
        raise ShardFormatError(f"not a .npy array: {error}") from error
    if dtype.hasobject:
        raise ShardFormatError("object arrays are not latents")
    count = int(np.prod(shape))
    if len(data) - stream.tell() < count * dtype.itemsize:
        raise ShardFormatError(f".npy payload is truncated: {len(data) - stream.tell()} bytes for shape {shape}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def decode_latent(data: bytes, dtype: str) -> torch.Tensor:
    """.npy bytes -> (C, h, w) tensor in the stored dtype (float16 or bfloat16)."""
    array = _read_npy(data)
    if array.ndim != 3:
        raise ShardFormatError(f"latent must be (C, h, w), got shape {array.shape}")
    if dtype == "float16":
        if array.dtype != np.float16:
            raise ShardFormatError(f"latent stored as {array.dtype}, index says float16")
        return torch.from_numpy(array.copy())
    if dtype == "bfloat16":
        if array.dtype != np.uint16:
            raise ShardFormatError(f"bfloat16 latent must be stored as uint16 bits, got {array.dtype}")
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    raise ShardFormatError(f"unknown latent dtype {dtype!r}")


def sample_members(
    key: str,
    latent: torch.Tensor,
    cls: int,
    *,
    dtype: str = "float16",
    latent_flip: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The tar members (extension -> bytes) of one sample."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys on them)")
    if latent.ndim != 3:
        raise ValueError(f"latent must be (C, h, w), got {tuple(latent.shape)}")
    if latent_flip is not None and latent_flip.shape != latent.shape:
        raise ValueError(f"flipped latent {tuple(latent_flip.shape)} differs from latent {tuple(latent.shape)}")
    info = dict(meta or {})
    info.update(cls=int(cls), latent_hw=[int(latent.shape[1]), int(latent.shape[2])], dtype=dtype)
    members = {"latent.npy": encode_latent(latent, dtype), "cls": str(int(cls)).encode(), "json": json.dumps(info).encode()}
    if latent_flip is not None:
        members["latent_flip.npy"] = encode_latent(latent_flip, dtype)
    return members


def decode_sample(key: str, members: dict[str, bytes]) -> LatentSample:
    """Tar members of one key -> LatentSample; a missing or malformed member is a ShardFormatError naming the key."""
    try:
        meta = json.loads(members["json"])
        dtype = meta.get("dtype", "float16")
        latent = decode_latent(members["latent.npy"], dtype)
        flip = decode_latent(members["latent_flip.npy"], dtype) if "latent_flip.npy" in members else None
        cls = int(members["cls"]) if "cls" in members else int(meta["cls"])
    except ShardFormatError as error:
        raise ShardFormatError(f"sample {key!r}: {error}") from error
    except (KeyError, ValueError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"sample {key!r} is malformed or incomplete: {error!r}") from error
    if list(latent.shape[1:]) != list(meta.get("latent_hw", latent.shape[1:])):
        raise ShardFormatError(f"sample {key!r}: latent {tuple(latent.shape)} disagrees with meta {meta['latent_hw']}")
    return LatentSample(key=key, latent=latent, latent_flip=flip, cls=cls, meta=meta)


class _HashingFile:
    """A file opened for writing that also hashes what goes through it: a shard's content digest costs no re-read."""

    def __init__(self, path: Path) -> None:
        self.handle, self.sha256 = open(path, "wb"), hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()


class ShardWriter:
    """Writes one shard atomically: members go to this process's temporary file, renamed on close; the sidecar last.
    The sidecar records the tar's sha256 (`sha256`): what the data's identity in a checkpoint is made of."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".tar":
            raise ValueError(f"shard path must end in .tar, got {self.path}")
        self.tmp_path = temporary_path(self.path)  # this process's own name: two runs never share a half tar
        self._file = _HashingFile(self.tmp_path)
        self._tar = tarfile.open(fileobj=self._file, mode="w")
        self.keys: list[str] = []
        self.lengths: list[int] = []

    def write(self, key: str, members: dict[str, bytes], num_tokens: int) -> None:
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            # mtime 0: an integer mtime keeps one header per member (18.4 MB -> 11.1 MB on 7200 members) and
            # makes shards byte-identical between runs, so resumed preparation is reproducible.
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)
        self.lengths.append(int(num_tokens))

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the tar, rename it into place, write the sidecar; returns the sidecar's content. If finishing fails
        (a full disk), the temporary file is removed and the error raised: the shard stays unfinished, a rerun redoes it."""
        try:
            self._tar.close()
            self._file.close()
            commit(self.tmp_path, self.path)
        except BaseException:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)
            raise
        sidecar = {"name": self.path.name, "num_samples": len(self.keys), "keys": self.keys, "lengths": self.lengths,
                   "sha256": self._file.sha256.hexdigest()}
        sidecar.update(extra or {})
        write_json(sidecar_path(self.path), sidecar, sort_keys=True)  # last: a tar without its sidecar counts as unfinished
        return sidecar

    def abort(self) -> None:
        """Drop the unfinished tar; never raises for the close (its error would hide the one that made us abort)."""
        try:
            self._tar.close()  # writes the end-of-archive blocks, which fails again on a full disk
        except OSError:
            pass
        finally:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)


def sidecar_path(shard_path: str | Path) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_suffix(".json")


def shard_is_complete(shard_path: str | Path) -> bool:
    """A shard counts as finished only when both the tar and its sidecar exist (the sidecar is written last)."""
    return Path(shard_path).exists() and sidecar_path(shard_path).exists()


def build_index(
    directory: str | Path, settings: dict[str, Any] | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """Merge the sidecars of the shards `names` (default: every *.tar of the directory, sorted by name, never by
    listdir order) into `index.json`. `prepare` passes its plan's names: a folder's other tars are not its data."""
    directory = Path(directory)
    shards = []
    paths = sorted(directory.glob("*.tar")) if names is None else [directory / name for name in names]
    for tar_path in paths:
        if not sidecar_path(tar_path).exists():
            raise ShardFormatError(f"shard {tar_path} has no sidecar {sidecar_path(tar_path).name}: it is unfinished")
        shards.append(read_json(sidecar_path(tar_path), "shard sidecar"))
    histogram = Counter(length for shard in shards for length in shard["lengths"])
    index = {
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "num_shards": len(shards),
        "length_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        # caption_tokens: per sample, beside lengths, when prepare counted them (--text-encoder; data/caption_tokens.py)
        "shards": [{k: shard[k] for k in ("name", "num_samples", "lengths", "caption_tokens", "sha256") if k in shard}
                   for shard in shards],
    }
    index["content_sha256"] = content_fingerprint(index)
    index.update(settings or {})
    write_json(directory / INDEX_NAME, index, sort_keys=True)
    return index


def content_fingerprint(index: dict[str, Any]) -> str:
    """The identity of a shard folder's data: sha256 over every shard's name, sample count, token lengths and (when
    its sidecar has one) the sha256 of its bytes. The same shards give the same value wherever they lie; shards made
    again from other images, or with other settings, give another."""
    rows = [[s["name"], s["num_samples"], s["lengths"], s.get("sha256")] for s in index.get("shards", [])]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def load_index(directory: str | Path) -> dict[str, Any]:
    """Read `index.json`; a missing index is an error that says how to make one."""
    path = Path(directory) / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"no {INDEX_NAME} in {directory}: run `python -m nit_lightning prepare` to write shards and their index"
        )
    return read_json(path, "shard index")
