"""Epoch plans: which samples go in which pack on which rank, from the token lengths of index.json alone."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nit_lightning.data import shards
from nit_lightning.data.caption_packing import caption_counts
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
    caption_tokens: np.ndarray | None = None  # (n,) int64 from index.json (prepare --text-encoder), else None
    cost: np.ndarray | None = None  # (n,) packing cost, image + caption tokens (data/caption_packing.py); None: tokens
    caption_token_cost: float = 0.0  # what made `cost`

    @property
    def num_samples(self) -> int:
        return int(self.tokens.size)

    @property
    def packing_cost(self) -> np.ndarray:
        """(n,) what a sample takes of tokens_per_pack: its tokens, + its caption's cost when one is set."""
        return self.tokens if self.cost is None else self.cost


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
                caption_tokens=caption_counts(index, path),
            )
        )
    if all(source.weight == 0 for source in sources):
        raise ValueError(f"every source has weight 0: nothing to train on ({[str(s.path) for s in sources]})")
    return sources


@dataclass
class Packing:
    """Every pack LPFHP made for one epoch, in packing order (before any is dropped to even out the ranks)."""

    ids: np.ndarray  # (N,) global sample ids, packs concatenated
    offsets: np.ndarray  # (Q + 1,)
    tokens: np.ndarray  # (N,) tokens per sample
    fill: np.ndarray  # (Q,) packing cost per pack (= image tokens unless a caption cost is set)
    flips: np.ndarray  # (N,) the flip each sample gets this epoch, whichever plan trains it

    def take(self, packs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample positions in `ids`, new offsets) of these packs, in this order."""
        sizes = np.diff(self.offsets)[packs]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        take = np.repeat(self.offsets[packs] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return take.astype(np.int64), offsets, sizes

    def image_tokens(self, packs: np.ndarray) -> int:
        """Image tokens of these packs (their `fill` also counts caption cost when one is set)."""
        return int(self.tokens[self.take(packs)[0]].sum())


@dataclass
class EpochPlan:
    """Packs of one epoch: pack j holds global sample ids ids[offsets[j]:offsets[j+1]]; rank r owns packs r, r+W, ...

    A plan continued on another world size (`continue_plan`) holds the epoch's remaining packs only: its steps are
    counted from `first_step` (the steps the epoch had taken), its packs from `packing` position `first_pack`.
    """

    epoch: int
    world_size: int
    ids: np.ndarray  # (M,) global sample ids (source offset + position in source), packs concatenated
    offsets: np.ndarray  # (P + 1,) with P = (packs_per_rank - first_step) · world_size
    flips: np.ndarray  # (M,) bool: use the stored flipped latent
    tokens: np.ndarray  # (M,) tokens per entry
    packs_per_rank: int  # steps of the whole epoch
    efficiency: float  # packing cost (image tokens, + caption cost if set) / (kept packs × tokens_per_pack)
    report: dict[str, int] = field(default_factory=dict)  # planned/kept/dropped counts, for logs and stats
    packing: Packing | None = None
    kept: np.ndarray | None = None  # (P,) position in `packing` of each pack of this plan, in plan order
    first_step: int = 0
    first_pack: int = 0
    base_world: int = 0  # the world size the epoch was first planned for (its flips follow that plan)

    def packs_done_after(self, steps: int) -> int:
        """Position in `packing` just past the last pack consumed after `steps` steps of the epoch: every pack
        before it was trained on or dropped, none after it was touched (what a resume on another world size needs)."""
        consumed = min(max(steps - self.first_step, 0) * self.world_size, len(self.offsets) - 1)
        return self.first_pack if consumed == 0 or self.kept is None else int(self.kept[consumed - 1]) + 1

    def rank_part(self, rank: int) -> "RankPlan":
        """The packs of one rank, in its consumption order (from `first_step` on)."""
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

    def pack_tokens(self, j: int) -> np.ndarray:
        """Planned tokens (from index.json) of each sample of pack j."""
        return self.tokens[int(self.offsets[j]) : int(self.offsets[j + 1])]


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
    all_tokens = np.concatenate([source.tokens for source in sources])  # image tokens: what the loader checks
    # what LPFHP packs against tokens_per_pack: image tokens, + ceil(c × caption tokens) with a caption cost
    all_cost = np.concatenate([source.packing_cost for source in sources])
    unit = "tokens" if all(s.cost is None for s in sources) else "tokens of image + caption cost"
    selected = epoch_selection(sources, seed, epoch)
    tokens = all_cost[selected]
    too_long = np.unique(selected[tokens > tokens_per_pack])
    if too_long.size:  # a sample never spans two packs: say which and how long, by source, shard and position
        first, longest = int(too_long[0]), int(all_cost[too_long].max())
        raise ValueError(
            f"tokens_per_pack={tokens_per_pack} is smaller than {too_long.size} samples, the longest {longest} {unit} "
            f"(the first: {_describe(sources, first)}, {int(all_cost[first])} {unit}); a sample never spans two "
            f"packs: raise tokens_per_pack to at least {longest}, or prepare those images smaller (--max-area, or a "
            f"fixed-S mode)"
        )
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
    fill = np.add.reduceat(all_cost[ids], offsets[:-1]) if num_packs else np.zeros(0, dtype=np.int64)
    # Unequal pack counts hang DDP: drop the P mod W least-full packs (logged; a new packing next epoch uses them).
    leftover = num_packs % world_size
    keep = np.ones(num_packs, dtype=bool)
    keep[np.argsort(fill, kind="stable")[:leftover]] = False
    per_rank = (num_packs - leftover) // world_size
    report = {"selected_samples": int(selected.size), "planned_packs": num_packs, "leftover_packs": leftover}
    report["leftover_samples"] = int(np.diff(offsets)[~keep].sum())
    full = Packing(ids, offsets.astype(np.int64), all_tokens[ids], fill, np.zeros(ids.size, dtype=bool))
    report["leftover_tokens"] = full.image_tokens(np.flatnonzero(~keep))
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
    take, new_offsets, _ = full.take(kept)
    ids = ids[take]
    flips = np.random.default_rng([seed, epoch, 0xF11]).random(ids.size) < flip_prob
    # the samples of packs this plan leaves out get flips too: a plan continued on another world size may train them
    full.flips[take] = flips
    others = np.ones(full.ids.size, dtype=bool)
    others[take] = False
    full.flips[others] = np.random.default_rng([seed, epoch, 0xF12]).random(int(others.sum())) < flip_prob
    report.update(packs_per_rank=per_rank, kept_samples=int(ids.size), kept_tokens=int(all_tokens[ids].sum()),
                  kept_cost=int(all_cost[ids].sum()))  # image tokens; what they and their captions took of the budget
    efficiency = report["kept_cost"] / (len(kept) * tokens_per_pack) if len(kept) else 0.0
    if unit != "tokens" and len(kept):
        log.info("epoch %d: packing efficiency %.3f counts image tokens + caption cost; image tokens alone fill %.3f "
                 "of tokens_per_pack", epoch, efficiency, report["kept_tokens"] / (len(kept) * tokens_per_pack))
    if leftover or report["unused_packs"]:
        log.warning(
            "epoch %d: %d packs over %d ranks -> %d per rank; dropped the %d least-full packs (%d samples, %d tokens) "
            "so every rank gets the same count%s",
            epoch, num_packs, world_size, per_rank, leftover, report["leftover_samples"], report["leftover_tokens"],
            f", and left {report['unused_packs']} packs unused (packs_per_epoch={packs_per_epoch})"
            if report["unused_packs"] else "",
        )  # fmt: skip
    return EpochPlan(epoch, world_size, ids, new_offsets, flips, all_tokens[ids], per_rank, efficiency, report,
                     packing=full, kept=kept, base_world=world_size)


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
