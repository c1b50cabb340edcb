"""Epoch plans (which samples go in which pack on which rank) from index.json lengths, and random-access shard reads."""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nit_lightning.data import shards
from nit_lightning.data.packing import StreamingPacker, lpfhp_flat

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One shard directory: its index, per-sample token lengths (at the patch size) and shard boundaries."""

    path: Path
    weight: float
    index: dict[str, Any]
    shard_names: list[str]
    shard_starts: np.ndarray  # (S + 1,) cumulative sample counts: shard s owns shard_starts[s]:shard_starts[s+1]
    tokens: np.ndarray  # (n,) int64 tokens per sample = h·w / p²

    @property
    def num_samples(self) -> int:
        return int(self.tokens.size)


def load_sources(specs: list[dict[str, Any]], patch_size: int) -> list[Source]:
    """[{"path": dir, "weight": w}, ...] -> Sources; a missing index, bad weight or odd length is a clear error."""
    if not specs:
        raise ValueError("sources is empty: give at least one {'path': <shard dir>, 'weight': 1.0}")
    sources = []
    for spec in specs:
        if not isinstance(spec, dict) or "path" not in spec or set(spec) - {"path", "weight"}:
            raise ValueError(f"source {spec!r} must be a dict with 'path' and optional 'weight' only")
        weight = float(spec.get("weight", 1.0))
        if not weight >= 0.0:
            raise ValueError(f"source {spec['path']}: weight {weight} must be ≥ 0 (uses of each sample per epoch)")
        path = Path(spec["path"])
        index = shards.load_index(path)
        lengths = np.array([n for shard in index["shards"] for n in shard["lengths"]], dtype=np.int64)
        area = patch_size * patch_size
        bad = np.flatnonzero(lengths % area)
        if bad.size:
            raise ValueError(
                f"source {path}: sample {int(bad[0])} has {int(lengths[bad[0]])} latent pixels, not a multiple of "
                f"patch_size²={area}; use patch_size 1 or re-prepare with sides that are multiples of {patch_size}"
            )
        counts = [int(shard["num_samples"]) for shard in index["shards"]]
        sources.append(
            Source(
                path=path,
                weight=weight,
                index={k: v for k, v in index.items() if k not in ("shards", "length_histogram")},  # keep it small
                shard_names=[shard["name"] for shard in index["shards"]],
                shard_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                tokens=lengths // area,
            )
        )
    if all(source.weight == 0 for source in sources):
        raise ValueError(f"every source has weight 0: nothing to train on ({[str(s.path) for s in sources]})")
    return sources


@dataclass
class EpochPlan:
    """Packs of one epoch: pack j holds global sample ids ids[offsets[j]:offsets[j+1]]; rank r owns packs r, r+W, ..."""

    epoch: int
    world_size: int
    ids: np.ndarray  # (M,) global sample ids (source offset + position in source), packs concatenated
    offsets: np.ndarray  # (P + 1,) with P = packs_per_rank · world_size
    flips: np.ndarray  # (M,) bool: use the stored flipped latent
    tokens: np.ndarray  # (M,) tokens per entry
    packs_per_rank: int
    efficiency: float  # real tokens / (kept packs × tokens_per_pack)
    report: dict[str, int] = field(default_factory=dict)  # planned/kept/dropped counts, for logs and stats

    def rank_part(self, rank: int) -> "RankPlan":
        """The packs of one rank, in its consumption order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        packs = np.arange(rank, len(self.offsets) - 1, self.world_size)
        sizes = (self.offsets[packs + 1] - self.offsets[packs]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        take = np.repeat(self.offsets[packs] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return RankPlan(self.epoch, rank, self.ids[take], offsets, self.flips[take], self.tokens[take])


@dataclass
class RankPlan:
    """One rank's packs of one epoch (what its dataloader workers receive)."""

    epoch: int
    rank: int
    ids: np.ndarray
    offsets: np.ndarray  # (packs_per_rank + 1,)
    flips: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pack(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(global ids, flips) of pack j."""
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return self.ids[a:b], self.flips[a:b]


def epoch_selection(sources: list[Source], seed: int, epoch: int) -> np.ndarray:
    """Global ids used in one epoch: weight w means ⌊w⌋ full passes plus a seeded random round((w−⌊w⌋)·n) subset."""
    chosen, start = [], 0
    for s, source in enumerate(sources):
        n = source.num_samples
        passes = int(np.floor(source.weight))
        extra = int(round((source.weight - passes) * n))
        ids = [np.tile(np.arange(n, dtype=np.int64), passes)]
        if extra:
            rng = np.random.default_rng([seed, epoch, s, 0x5E1])
            ids.append(np.sort(rng.choice(n, size=extra, replace=False)))
        chosen.append(np.concatenate(ids) + start)
        start += n
    return np.concatenate(chosen)


def build_plan(
    sources: list[Source],
    *,
    seed: int,
    epoch: int,
    tokens_per_pack: int,
    max_images_per_pack: int | None,
    world_size: int,
    flip_prob: float,
    packs_per_epoch: int | None = None,
    buffer_size: int = 0,
) -> EpochPlan:
    """Select, pack (LPFHP seeded by (seed, epoch); whole epoch or streaming buffer) and split it equally over ranks."""
    all_tokens = np.concatenate([source.tokens for source in sources])
    selected = epoch_selection(sources, seed, epoch)
    tokens = all_tokens[selected]
    try:
        if buffer_size > 0:  # stream a seeded permutation through a bounded LPFHP buffer
            order = np.random.default_rng([seed, epoch, 0x0DE]).permutation(selected.size)
            packer = StreamingPacker(tokens_per_pack, buffer_size, max_images_per_pack, seed=hash_seed(seed, epoch))
            local, offsets = packer.pack_indices(tokens[order])
            local = order[local]
        else:
            local, offsets = lpfhp_flat(tokens, tokens_per_pack, max_images_per_pack, seed=[seed, epoch, 0xBAC])
    except ValueError as error:  # name the sample by its source, not by its position in the epoch
        bad = int(selected[np.flatnonzero((tokens <= 0) | (tokens > tokens_per_pack))[0]])
        raise ValueError(f"{_describe(sources, bad)}: {error}") from error
    ids = selected[local]
    num_packs = len(offsets) - 1
    fill = np.add.reduceat(all_tokens[ids], offsets[:-1]) if num_packs else np.zeros(0, dtype=np.int64)
    # Unequal pack counts hang DDP: drop the P mod W least-full packs (logged; a new packing next epoch uses them).
    leftover = num_packs % world_size
    keep = np.ones(num_packs, dtype=bool)
    keep[np.argsort(fill, kind="stable")[:leftover]] = False
    per_rank = (num_packs - leftover) // world_size
    report = {"selected_samples": int(selected.size), "planned_packs": num_packs, "leftover_packs": leftover}
    report["leftover_samples"] = int(np.diff(offsets)[~keep].sum())
    report["leftover_tokens"] = int(fill[~keep].sum())
    if packs_per_epoch is not None:
        if packs_per_epoch > per_rank:
            raise ValueError(
                f"packs_per_epoch={packs_per_epoch} but epoch {epoch} has only {per_rank} packs per rank "
                f"({num_packs} packs over {world_size} ranks); lower it, raise source weights or leave it None"
            )
        kept = np.flatnonzero(keep)
        keep[kept[packs_per_epoch * world_size :]] = False  # packs are in random order: keep the first ones
        per_rank = packs_per_epoch
    report["unused_packs"] = int(num_packs - leftover - per_rank * world_size)
    kept = np.flatnonzero(keep)
    sizes = np.diff(offsets)[kept]
    new_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    take = np.repeat(offsets[kept] - new_offsets[:-1], sizes) + np.arange(new_offsets[-1])
    ids = ids[take]
    flips = np.random.default_rng([seed, epoch, 0xF11]).random(ids.size) < flip_prob
    report.update(packs_per_rank=per_rank, kept_samples=int(ids.size), kept_tokens=int(all_tokens[ids].sum()))
    efficiency = report["kept_tokens"] / (len(kept) * tokens_per_pack) if len(kept) else 0.0
    if leftover or report["unused_packs"]:
        log.warning(
            "epoch %d: %d packs over %d ranks -> %d per rank; dropped the %d least-full packs (%d samples, %d tokens) "
            "so every rank gets the same count%s",
            epoch, num_packs, world_size, per_rank, leftover, report["leftover_samples"], report["leftover_tokens"],
            f", and left {report['unused_packs']} packs unused (packs_per_epoch={packs_per_epoch})"
            if report["unused_packs"] else "",
        )  # fmt: skip
    return EpochPlan(epoch, world_size, ids, new_offsets, flips, all_tokens[ids], per_rank, efficiency, report)


def hash_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed from (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch, 0x57E]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _describe(sources: list[Source], global_id: int) -> str:
    """'source <dir>, shard <name>, sample #k' for a global id."""
    source_index, shard_index, position = locate(sources, global_id)
    source = sources[source_index]
    return f"source {source.path}, shard {source.shard_names[shard_index]}, sample #{position}"


def locate(sources: list[Source], global_id: int) -> tuple[int, int, int]:
    """Global id -> (source index, shard index, position in shard)."""
    start = 0
    for s, source in enumerate(sources):
        if global_id < start + source.num_samples:
            local = global_id - start
            shard = int(np.searchsorted(source.shard_starts, local, side="right") - 1)
            return s, shard, int(local - source.shard_starts[shard])
        start += source.num_samples
    raise IndexError(f"sample id {global_id} is beyond the {start} samples of all sources")


BLOCK = 512  # tar blocks: a 512-byte header, then the data padded to a multiple of 512


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def scan_tar(path: Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of an uncompressed tar, from headers only.

    ~20× faster than tarfile on pax headers (which `ShardWriter` emits for float mtimes). A truncated tar ends the list
    early (logged); the members it lost are reported per sample by `ShardReader.read`."""
    out: list[tuple[str, int, int]] = []
    pending_name: str | None = None  # from a pax 'path' record or a GNU long name, applies to the next member
    position = 0
    with open(path, "rb") as handle:
        while True:
            header = handle.read(BLOCK)
            if len(header) < BLOCK or header == bytes(BLOCK):
                if 0 < len(header) < BLOCK:
                    log.warning("shard %s is truncated inside a header after %d members", path, len(out))
                break
            if sum(header[:148]) + sum(header[156:]) + 8 * 32 != _octal(header[148:156]):
                log.warning("shard %s has a corrupt header at byte %d after %d members", path, position, len(out))
                break
            size, kind = _octal(header[124:136]), header[156:157]
            data_offset = position + BLOCK
            if kind in (b"x", b"L"):
                payload = handle.read(size)
                if kind == b"L":
                    pending_name = payload.split(b"\0", 1)[0].decode()
                else:
                    for record in payload.decode().split("\n"):
                        _, _, item = record.partition(" ")
                        if item.startswith("path="):
                            pending_name = item[len("path=") :]
            elif kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode()
                name = pending_name or (f"{prefix}/{name}" if prefix else name)
                out.append((name, data_offset, size))
                pending_name = None
            elif kind != b"g":
                pending_name = None
            position = data_offset + -(-size // BLOCK) * BLOCK
            handle.seek(position)
    return out


class ShardReadError(RuntimeError):
    """A sample that could not be read; the message names the shard and the key."""


class ShardReader:
    """Random access to samples of uncompressed tars: member offsets scanned once per shard, then seek + read."""

    def __init__(self, max_cached_shards: int = 256):
        self.max_cached_shards = max_cached_shards
        self._tables: OrderedDict[Path, tuple[list[str], dict[str, dict[str, tuple[int, int]]], int]] = OrderedDict()

    def _table(self, shard_path: Path) -> tuple[list[str], dict[str, dict[str, tuple[int, int]]], int]:
        """(keys from the sidecar, key -> {extension: (data offset, size)}, file size), LRU-cached."""
        if shard_path in self._tables:
            self._tables.move_to_end(shard_path)
            return self._tables[shard_path]
        sidecar = shards.sidecar_path(shard_path)
        try:
            keys = json.loads(sidecar.read_text())["keys"]
            members: dict[str, dict[str, tuple[int, int]]] = {}
            for name, offset, length in scan_tar(shard_path):
                key, _, extension = os.path.basename(name).partition(".")
                members.setdefault(key, {})[extension] = (offset, length)
            size = shard_path.stat().st_size
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as error:
            raise ShardReadError(f"shard {shard_path} (or its sidecar) is unreadable: {error!r}") from error
        self._tables[shard_path] = (keys, members, size)
        if len(self._tables) > self.max_cached_shards:
            self._tables.popitem(last=False)
        return self._tables[shard_path]

    def read(self, shard_path: Path, position: int, flip: bool = False) -> tuple[shards.LatentSample, bool]:
        """(sample #position of a shard, flipped?): with flip, only the mirrored latent is read (when stored) and put
        in `.latent`; every failure is a ShardReadError naming the shard and the key."""
        keys, members, file_size = self._table(shard_path)
        if position >= len(keys):
            raise ShardReadError(f"shard {shard_path}: sidecar lists {len(keys)} keys, sample #{position} is missing")
        key = keys[position]
        entry = members.get(key)
        if not entry:
            raise ShardReadError(f"shard {shard_path}: sample {key!r} is not in the tar (truncated shard?)")
        flipped = flip and "latent_flip.npy" in entry
        wanted = {"json": "json", "cls": "cls", "latent.npy": "latent_flip.npy" if flipped else "latent.npy"}
        data = {}
        try:
            with open(shard_path, "rb") as handle:
                for extension, stored in wanted.items():  # read one latent of two: half the bytes
                    if stored not in entry:
                        if extension == "cls":
                            continue
                        raise ShardReadError(f"shard {shard_path}: sample {key!r} has no member {key}.{stored}")
                    offset, size = entry[stored]
                    handle.seek(offset)
                    data[extension] = handle.read(size)
                    if len(data[extension]) != size:
                        raise ShardReadError(
                            f"shard {shard_path}: member {key}.{stored} is cut short ({len(data[extension])} of "
                            f"{size} bytes; file is {file_size} bytes): the tar is truncated"
                        )
            return shards.decode_sample(key, data), flipped
        except shards.ShardFormatError as error:
            raise ShardReadError(f"shard {shard_path}: {error}") from error
        except OSError as error:
            raise ShardReadError(f"shard {shard_path}: sample {key!r} could not be read: {error!r}") from error
