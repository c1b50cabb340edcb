"""The loader of one rank's packs: a dataset that reads each planned pack from the shards (corrupt or stale samples
skipped and counted, or raised), the DataLoader that hands packs to Lightning and keeps the data position, the counts."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nit_lightning.data.batch import PackedBatch
from nit_lightning.data.epochs import RankPlan, Source, locate
from nit_lightning.data.shard_reader import ShardReader, ShardReadError
from nit_lightning.models.patching import pack_latents

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
REPEAT_MARK = "(repeat) "  # key prefix of a stand-in pack whose own samples all failed


class TooMuchSkipped(RuntimeError):
    """on_error='skip' took out more than max_skipped_fraction of an epoch's planned samples: the run stops."""


@dataclass
class LoaderStats:
    """What one loader delivered this epoch, counted in the consuming process (a callback can log these)."""

    epoch: int = 0
    packs: int = 0
    images: int = 0
    tokens: int = 0
    skipped_samples: int = 0  # planned samples that a corrupt shard/sample took out of their pack
    skipped_shards: int = 0  # distinct shards that lost at least one sample this epoch
    skipped_shard_names: list[str] = field(default_factory=list)  # "<dir>/<shard>" of those, sorted
    planned_samples: int = 0  # samples of the packs delivered so far, as planned (skipped ones included)
    seconds: float = 0.0  # wall time since the epoch's iterator started
    wait_seconds: float = 0.0  # time the consumer waited for the next pack (≈ 0 when loading keeps up)
    last_pack_tokens: int = 0
    last_pack_images: int = 0
    plan_efficiency: float = 0.0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_samples / self.planned_samples if self.planned_samples else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.pop("skipped_shard_names")
        out.update(samples_per_s=self.samples_per_s, tokens_per_s=self.tokens_per_s,
                   skipped_fraction=self.skipped_fraction)
        return out


ORDERS_IN_PACK = ("plan", "size")


def check_order_in_pack(order: str) -> str:
    if order not in ORDERS_IN_PACK:
        raise ValueError(f"order_in_pack={order!r} must be one of {ORDERS_IN_PACK}")
    return order


def size_order(latents: list[torch.Tensor], captions: list[str | None]) -> list[int]:
    """Positions sorted by (token grid, caption words), stable: equal neighbours make one batched attention call in
    the CPU `loop` backend (self- and cross-attention batch runs of equal lengths). Which images a pack holds, and each
    image's loss, do not change; the noise drawn per image follows the new order."""
    def key(i: int) -> tuple:
        return (*latents[i].shape[-2:], len((captions[i] or "").split()))

    return sorted(range(len(latents)), key=key)


class PackDataset(IterableDataset):
    """Yields one rank's packs; worker w of K takes packs start+w, start+w+K, … (round-robin = plan order).

    `order_in_pack` "plan" keeps the plan's order of images inside a pack; "size" groups equal token grids (and caption
    lengths) together, which the CPU attention loop runs as one call each (about 8% of a T2I demo step)."""

    def __init__(self, sources: list[Source], patch_size: int, on_error: str, order_in_pack: str = "plan"):
        self.sources, self.patch_size, self.on_error = sources, patch_size, on_error
        self.order_in_pack = check_order_in_pack(order_in_pack)
        self.plan: RankPlan | None = None  # set by the loader before each iteration (pickled into the workers)
        self.start = 0

    def __iter__(self) -> Iterator[PackedBatch]:
        if self.plan is None:
            raise RuntimeError("PackDataset has no plan: iterate it through NativeLatentDataModule's dataloaders")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader()
        last_good: PackedBatch | None = None
        mine = range(self.start + worker, len(self.plan), workers)
        for j in mine:
            batch, dropped = self.load_pack(j, reader)
            if batch is None:  # every sample failed: an empty step would hang DDP, so stand in another pack, marked
                later = (b for k in mine if k > j if (b := self.load_pack(k, reader)[0]) is not None)
                stand_in = last_good or next(later, None)
                if stand_in is None:
                    raise ShardReadError(f"epoch {self.plan.epoch}: pack {j} and all later packs of this worker failed")
                log.error("epoch %d pack %d: all samples failed; a copy of another pack stands in", self.plan.epoch, j)
                keys = [REPEAT_MARK + key.removeprefix(REPEAT_MARK) for key in stand_in.keys]
                batch = replace(stand_in, keys=keys, dropped=dropped)
            else:
                last_good = batch
            yield batch

    def load_pack(self, j: int, reader: ShardReader) -> tuple[PackedBatch | None, list[str]]:
        """Read and patchify pack j -> (batch, "<dir>/<shard>" of each sample left out); with on_error='skip' a failed
        sample is logged and left out; batch is None when all failed."""
        ids, flips = self.plan.pack(j)
        planned = self.plan.pack_tokens(j)  # tokens per sample from index.json: what the packing trusted
        places = [locate(self.sources, int(i)) for i in ids]
        latents: list[torch.Tensor | None] = [None] * len(ids)
        labels, keys, dropped = [0] * len(ids), [""] * len(ids), []
        captions: list[str | None] = [None] * len(ids)
        p = self.patch_size
        for i in sorted(range(len(ids)), key=places.__getitem__):  # shard by shard, in file order
            s, shard, position = places[i]
            source = self.sources[s]
            path = source.path / source.shard_names[shard]
            try:
                sample, _ = reader.read(path, position, flip=bool(flips[i]))
                check_planned(path, sample.key, sample.latent, int(planned[i]), p, source.index.get("latent_channels"))
            except ShardReadError as error:
                if self.on_error == "raise":
                    raise
                log.warning("epoch %d pack %d loses a sample (on_error=skip): %s", self.plan.epoch, j, error)
                dropped.append(f"{source.path.name}/{source.shard_names[shard]}")
                continue
            latents[i] = sample.latent  # the mirrored latent when the plan says flip and the shard has one
            labels[i] = sample.cls
            captions[i] = sample.caption  # a mirrored latent keeps its caption (flip_prob 0 for "left"/"right" texts)
            keys[i] = f"{source.path.name}/{source.shard_names[shard].removesuffix('.tar')}/{sample.key}"
        kept = [i for i in range(len(ids)) if latents[i] is not None]
        if not kept:
            return None, dropped
        if self.order_in_pack == "size":
            kept = [kept[k] for k in size_order([latents[i] for i in kept], [captions[i] for i in kept])]
        x, hw = pack_latents([latents[i].float() for i in kept], p)  # (N, C·p·p) float32, (B, 2) token grids
        batch = PackedBatch(
            x=x,
            hw=hw,
            y=torch.tensor([labels[i] for i in kept], dtype=torch.long),
            seqlens=hw[:, 0] * hw[:, 1],
            keys=[keys[i] for i in kept],
            dropped=dropped,
            captions=pack_captions([captions[i] for i in kept], [keys[i] for i in kept]),
        )
        return batch, dropped


def pack_captions(captions: list[str | None], keys: list[str]) -> list[str] | None:
    """The pack's captions in batch order, or None when no sample has one (class-conditional shards); a pack of both
    kinds means captioned and class-conditional sources were mixed, which no model can train on."""
    if all(c is None for c in captions):
        return None
    if any(c is None for c in captions):
        with_text = [k for k, c in zip(keys, captions) if c is not None]
        without = [k for k, c in zip(keys, captions) if c is None]
        raise ShardReadError(
            f"a pack mixes captioned samples ({', '.join(with_text[:2])}) and samples without a caption "
            f"({', '.join(without[:2])}): use only sources prepared with --captions, or only without"
        )
    return captions


def check_planned(path, key: str, latent: torch.Tensor, planned: int, patch_size: int, channels: int | None) -> None:
    """A latent must be what index.json promised: the packer budgeted `planned` tokens for it (a stale index once gave
    packs of 2371 tokens against a budget of 512, an OOM on a GPU, with packing efficiency logged as 1.0)."""
    c, h, w = latent.shape
    real = (h // patch_size) * (w // patch_size)
    if h % patch_size or w % patch_size or real != planned or (channels is not None and c != channels):
        raise ShardReadError(
            f"shard {path}: sample {key!r} is a {c}×{h}×{w} latent ({real} tokens at patch size {patch_size}), but "
            f"index.json plans {planned} tokens of {channels} channels: the index does not describe this shard (stale, "
            f"or the shard was replaced); rebuild it with `python -m nit_lightning prepare --output "
            f"{Path(path).parent} --reindex`, or prepare the folder again"
        )


@dataclass
class EpochStart:
    """What a loader gets from its data module when an iterator starts: where to begin and what to count into."""

    epoch: int
    start: int  # first pack of this rank's plan (> 0 when resuming mid-epoch)
    first_step: int  # steps of the epoch before this plan's first pack (> 0: a plan continued on another world size)
    rank: int
    rank_plan: RankPlan
    stats: LoaderStats
    max_skipped_fraction: float


class DataPosition(Protocol):
    """The data module's side of a PackLoader: it owns the plans and the resume position; the loader only reports."""

    def packs_per_rank(self, kind: str) -> int: ...

    def start_epoch(self, kind: str) -> EpochStart: ...

    def delivered(self, kind: str, epoch: int, packs: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackLoader(DataLoader):
    """DataLoader(batch_size=None) that asks its data module for the epoch's plan and start on every `iter()`."""

    def __init__(self, owner: DataPosition, kind: str, dataset: PackDataset, num_workers: int):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self._owner, self._kind = owner, kind

    def __len__(self) -> int:
        return self._owner.packs_per_rank(self._kind)

    def state_dict(self) -> dict[str, Any]:
        """Lightning saves this with the loops (and then treats the loader as resumable): the data module's position."""
        return self._owner.state_dict() if self._kind == "train" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._kind == "train" and state:
            self._owner.load_state_dict(state)

    def __iter__(self) -> Iterator[PackedBatch]:  # type: ignore[override]
        begun = self._owner.start_epoch(self._kind)
        epoch, start, rank_plan, stats = begun.epoch, begun.start, begun.rank_plan, begun.stats
        self.dataset.plan, self.dataset.start = rank_plan, start
        # The limit holds over what this iterator will deliver (from `start` on a resume): it fails as soon as the
        # count is certain to exceed it, not after training on the rest of a damaged epoch.
        total = int(rank_plan.offsets[-1] - rank_plan.offsets[start])
        limit = begun.max_skipped_fraction * total
        damaged: set[str] = set()
        began = time.perf_counter()
        iterator = super().__iter__()
        j = start
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            now = time.perf_counter()
            planned = int(rank_plan.offsets[j + 1] - rank_plan.offsets[j])
            stats.packs += 1
            stats.images += batch.num_images
            stats.tokens += batch.num_tokens
            repeated = bool(batch.keys) and batch.keys[0].startswith(REPEAT_MARK)
            stats.skipped_samples += planned if repeated else max(planned - batch.num_images, 0)
            stats.planned_samples += planned
            if batch.dropped:
                damaged.update(batch.dropped)
                stats.skipped_shards, stats.skipped_shard_names = len(damaged), sorted(damaged)
            stats.wait_seconds += now - asked
            stats.seconds = now - began
            stats.last_pack_tokens, stats.last_pack_images = batch.num_tokens, batch.num_images
            j += 1
            self._owner.delivered(self._kind, epoch, begun.first_step + j)  # steps of the whole epoch
            if stats.skipped_samples > limit:
                raise TooMuchSkipped(
                    f"{self._kind} epoch {epoch}, rank {begun.rank}: {stats.skipped_samples} of the {total} planned "
                    f"samples ({stats.skipped_samples / max(total, 1):.2%}) were skipped as unreadable or not as indexed "
                    f"(on_error=skip), from {len(damaged)} shards ({', '.join(sorted(damaged)[:3])}"
                    f"{', …' if len(damaged) > 3 else ''}); the limit is max_skipped_fraction="
                    f"{begun.max_skipped_fraction:g}: repair or re-prepare those shards (the warnings name each "
                    f"sample), or raise data.max_skipped_fraction"
                )
            yield batch


class PredictPacks:
    """A PackLoader seen as a plain iterable: Lightning rebuilds DataLoaders for `predict` to track sample indices
    (which a PackLoader's signature does not allow); packs carry their own sample keys instead."""

    def __init__(self, loader: PackLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
