"""NativeLatentDataModule: latent shards -> LPFHP packs -> one `PackedBatch` per rank per step, resumable, DDP-equal."""
from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L

from nit_lightning import distributed
from nit_lightning.data.caption_packing import apply_caption_cost, check_caption_token_cost
from nit_lightning.data.epochs import EpochPlan, Source, build_plan, load_sources
from nit_lightning.data.loader import (ON_ERROR, EpochStart, LoaderStats, PackDataset, PackLoader, PredictPacks,
                                      check_order_in_pack)
from nit_lightning.data.resume import continue_plan
from nit_lightning.data.shards import content_fingerprint
from nit_lightning.records import plain

log = logging.getLogger(__name__)


class NativeLatentDataModule(L.LightningDataModule):
    """Packs of native-resolution latents from shard directories (SPEC §4–5); see docs/packing.md."""

    def __init__(
        self,
        sources: list[dict],
        tokens_per_pack: int = 65536,
        max_images_per_pack: int | None = None,
        buffer_size: int = 8192,
        num_workers: int = 2,
        seed: int = 0,
        flip_prob: float = 0.5,
        patch_size: int = 1,
        on_error: str = "skip",
        val_sources: list[dict] | None = None,
        packs_per_epoch: int | None = None,
        test_sources: list[dict] | None = None,
        max_skipped_fraction: float = 0.01,
        caption_token_cost: float = 0.0,  # a caption token's share of tokens_per_pack (data/caption_packing.py)
        order_in_pack: str = "plan",  # "size": images of equal size (and caption length) next to each other (loader.py)
    ):
        super().__init__()
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction={max_skipped_fraction} must be in [0, 1] (0.01: fail past 1%)")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob={flip_prob} must be in [0, 1]")
        if tokens_per_pack < 1 or patch_size < 1 or num_workers < 0 or buffer_size < 0:
            raise ValueError(
                f"tokens_per_pack={tokens_per_pack}, patch_size={patch_size} must be ≥ 1 and "
                f"num_workers={num_workers}, buffer_size={buffer_size} ≥ 0"
            )
        if packs_per_epoch is not None and packs_per_epoch < 1:
            raise ValueError(f"packs_per_epoch={packs_per_epoch} must be ≥ 1 or None (all packs)")
        self.source_specs, self.val_source_specs, self.test_source_specs = list(sources), val_sources, test_sources
        self.tokens_per_pack, self.max_images_per_pack = tokens_per_pack, max_images_per_pack
        self.buffer_size, self.num_workers, self.seed = buffer_size, num_workers, seed
        self.flip_prob, self.patch_size, self.on_error = flip_prob, patch_size, on_error
        self.packs_per_epoch, self.caption_token_cost = packs_per_epoch, check_caption_token_cost(caption_token_cost)
        self.max_skipped_fraction = float(max_skipped_fraction)  # of an epoch's planned samples, per rank and loader
        self.order_in_pack = check_order_in_pack(order_in_pack)
        self._sources: dict[str, list[Source]] = {}
        self._plans: dict[str, EpochPlan] = {}
        self._distributed: tuple[int, int] | None = None
        self._next_epoch = 0  # used without a trainer: every train iter() is one more epoch
        self._resume: tuple[int, int] | None = None
        self._continue: dict[str, int] | None = None  # a resumed epoch's position in its packing (data/resume.py)
        self._continued: EpochPlan | None = None  # ... and the plan of its remaining packs
        self._consumed: dict[str, tuple[int, int]] = {}
        self.stats: dict[str, LoaderStats] = {}
        self.latent_channels: int | None = None
        self.codec_description: dict | None = None
        self._load()

    # ---- setup -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read the indexes (lengths only), check that every source agrees on channels and codec."""
        self._sources["train"] = load_sources(self.source_specs, self.patch_size)
        if self.val_source_specs:
            self._sources["val"] = load_sources(self.val_source_specs, self.patch_size)
        if self.test_source_specs:
            self._sources["test"] = load_sources(self.test_source_specs, self.patch_size)
        for kind, group in self._sources.items():  # every split: an evaluation pack must fit the memory too
            apply_caption_cost(group, self.caption_token_cost, kind)
        seen = {}
        for source in [s for group in self._sources.values() for s in group]:
            seen[str(source.path)] = (source.index.get("latent_channels"), source.index.get("codec"))
        if len({repr(v) for v in seen.values()}) > 1:
            raise ValueError(f"sources disagree on (latent_channels, codec): {seen}; prepare them with the same codec")
        self.latent_channels, self.codec_description = next(iter(seen.values()))
        if self.latent_channels is None:
            raise ValueError(f"index.json of {list(seen)} has no 'latent_channels': re-run `prepare` to write it")

    def override_distributed(self, rank: int, world_size: int) -> None:
        """Fix (rank, world size) instead of reading torch.distributed / env (tests, custom launchers)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self._distributed = (rank, world_size)

    def rank_world(self) -> tuple[int, int]:
        """The override, else the attached trainer's ranks, else the process group / launcher environment."""
        if self._distributed is not None:
            return self._distributed
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        ranks = distributed.current()
        return ranks.rank, ranks.world

    def provenance(self) -> dict[str, Any]:
        """The settings that decide what is trained on, source paths absolute: recorded in every checkpoint, compared
        by a resume. Workers, the error policy and the evaluation splits decide nothing about the training data."""
        return {
            "sources": [{**plain(spec), "path": os.path.realpath(os.path.expanduser(str(spec["path"]))),
                         "weight": float(spec.get("weight", 1.0))} for spec in self.source_specs],
            "tokens_per_pack": self.tokens_per_pack, "max_images_per_pack": self.max_images_per_pack,
            "buffer_size": self.buffer_size, "seed": self.seed, "flip_prob": self.flip_prob,
            "patch_size": self.patch_size, "packs_per_epoch": self.packs_per_epoch,
            "max_skipped_fraction": self.max_skipped_fraction, "content": self.content(),
            **({"caption_token_cost": self.caption_token_cost} if self.caption_token_cost else {}),  # 0: as before it
        }

    def content(self) -> dict[str, str]:
        """{source path: content fingerprint of its shards} (data/shards.py): the data's identity, not its address."""
        return {str(source.path.resolve()): source.index.get("content_sha256") or content_fingerprint(source.index)
                for source in self._sources["train"]}

    def trained_tokens(self) -> list[int] | None:
        """[fewest, most] tokens of one training image (index.json lengths at the patch size, sources of weight > 0):
        the token grids a checkpoint was trained on (records.SamplingRecipe)."""
        lengths = [s.tokens for s in self._sources["train"] if s.weight > 0 and s.num_samples]
        if not lengths:
            return None
        return [int(min(t.min() for t in lengths)), int(max(t.max() for t in lengths))]

    # ---- plans and positions -----------------------------------------------------------------------------------
    def _plan_for(self, kind: str, epoch: int) -> EpochPlan:
        """The (cached) global plan of one epoch; validation always uses epoch 0, no flips, the fixed seed. A resumed
        training epoch is the rest of its packing from the saved position, split over this world (data/resume.py)."""
        _, world = self.rank_world()
        resumed = self._continue if kind == "train" and self._continue and self._continue["epoch"] == epoch else None
        if resumed and (self._continued is None or self._continued.epoch != epoch or
                        self._continued.world_size != world):
            first = self._build(kind, epoch, resumed["world_size"])
            self._continued = continue_plan(first, packs_done=resumed["packs_done"], first_step=resumed["steps"],
                                            world_size=world, packs_per_epoch=self.packs_per_epoch,
                                            tokens_per_pack=self.tokens_per_pack)
        if resumed:
            return self._continued
        plan = self._plans.get(kind)
        if plan is None or plan.epoch != epoch or plan.world_size != world:
            plan = self._plans[kind] = self._build(kind, epoch, world)
        return plan

    def _build(self, kind: str, epoch: int, world: int) -> EpochPlan:
        return build_plan(
            self._sources[kind],
            seed=self.seed,
            epoch=epoch,
            tokens_per_pack=self.tokens_per_pack,
            max_images_per_pack=self.max_images_per_pack,
            world_size=world,
            flip_prob=self.flip_prob if kind == "train" else 0.0,
            packs_per_epoch=self.packs_per_epoch if kind == "train" else None,
            buffer_size=self.buffer_size,
        )

    def _upcoming_epoch(self, kind: str) -> int:
        if kind != "train":
            return 0
        if self.trainer is not None and getattr(self.trainer, "fit_loop", None) is not None:
            return int(self.trainer.current_epoch)
        return self._next_epoch

    def packs_per_rank(self, kind: str) -> int:
        """Packs each rank gets in the upcoming epoch of `kind` (the loader's length)."""
        return self._plan_for(kind, self._upcoming_epoch(kind)).packs_per_rank

    def start_epoch(self, kind: str) -> EpochStart:
        """Epoch, first pack and plan for a new iterator; consumes a pending resume position if it matches."""
        epoch, start = self._upcoming_epoch(kind), 0
        if kind == "train":
            if self._resume is not None and self._resume[0] == epoch:
                start = self._resume[1]
                if start >= self._plan_for(kind, epoch).packs_per_rank and self.trainer is None:
                    epoch, start = epoch + 1, 0  # the saved epoch was complete: the next one starts fresh
            self._resume = None
            self._next_epoch = epoch + 1
        plan = self._plan_for(kind, epoch)
        rank, _ = self.rank_world()
        if start:
            log.info("resuming %s data at epoch %d, pack %d of %d", kind, epoch, start, plan.packs_per_rank)
        self.stats[kind] = LoaderStats(epoch=epoch, plan_efficiency=plan.efficiency)
        return EpochStart(epoch, start - plan.first_step, plan.first_step, rank, plan.rank_part(rank), self.stats[kind],
                          self.max_skipped_fraction)

    def delivered(self, kind: str, epoch: int, packs: int) -> None:
        """The loader of `kind` has handed out `packs` steps of `epoch` (the position without a trainer)."""
        self._consumed[kind] = (epoch, packs)

    @property
    def packing_efficiency(self) -> float:
        """Packing cost (image tokens, + caption cost with caption_token_cost > 0) / (packs × tokens_per_pack) of the
        current training plan (planning epoch 0 if none yet)."""
        return self._plan_for("train", self._current_epoch()).efficiency

    @property
    def plan_report(self) -> dict[str, int]:
        """Counts of the current training plan: planned/kept/dropped packs, samples, tokens."""
        return dict(self._plan_for("train", self._current_epoch()).report)

    def _current_epoch(self) -> int:
        return self._plans["train"].epoch if "train" in self._plans else self._continue["epoch"] if self._continue \
            else 0

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> PackLoader:
        dataset = PackDataset(self._sources["train"], self.patch_size, self.on_error, self.order_in_pack)
        return PackLoader(self, "train", dataset, self.num_workers)

    def _evaluation_loader(self, kind: str) -> PackLoader:
        """Fixed packs of an evaluation split: epoch 0, the fixed seed, no flips (like validation)."""
        dataset = PackDataset(self._sources[kind], self.patch_size, self.on_error, self.order_in_pack)
        return PackLoader(self, kind, dataset, self.num_workers)

    def val_dataloader(self) -> PackLoader | list:
        return self._evaluation_loader("val") if "val" in self._sources else []

    def test_dataloader(self) -> PackLoader:
        if "test" not in self._sources:
            raise ValueError("`test` needs --data.test_sources (shard directories of the test split); none is set")
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> PredictPacks:
        """`predict` scores the test split, else the validation split (per-image losses, see NiTModule.predict_step)."""
        for kind in ("test", "val"):
            if kind in self._sources:
                return PredictPacks(self._evaluation_loader(kind))
        raise ValueError("`predict` needs --data.test_sources or --data.val_sources; neither is set")

    def state_dict(self) -> dict[str, Any]:
        """Data position (epoch, packs consumed by this rank) plus what must match for it to mean the same data."""
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "fit_loop", None) is not None:
            # Lightning's count of processed training batches: exact, unlike the loader count (it prefetches one).
            epoch = int(trainer.current_epoch)
            consumed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        else:
            epoch, consumed = self._consumed.get("train", (self._next_epoch, 0))
        _, world = self.rank_world()
        plan = self._plan_for("train", epoch) if consumed else None
        return {
            "epoch": epoch,
            "packs_consumed": consumed,
            # where the epoch stands in its packing, and the world it was planned for: enough to continue it exactly
            # on any number of ranks (data/resume.py)
            "packs_done": plan.packs_done_after(consumed) if plan else 0,
            "epoch_world_size": plan.base_world if plan else world,
            "seed": self.seed,
            "world_size": world,
            "tokens_per_pack": self.tokens_per_pack,
            "max_images_per_pack": self.max_images_per_pack,
            "buffer_size": self.buffer_size,
            "content": self.content(), "caption_token_cost": self.caption_token_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at (epoch, packs_consumed): on any world size the rest of the epoch follows exactly (each sample once,
        data/resume.py); a changed seed or budget makes another plan: warn and restart the epoch."""
        _, world = self.rank_world()
        now = {"seed": self.seed, "world_size": world, "tokens_per_pack": self.tokens_per_pack,
               "max_images_per_pack": self.max_images_per_pack, "buffer_size": self.buffer_size,
               "content": self.content(), "caption_token_cost": self.caption_token_cost}  # fmt: skip
        state = {"caption_token_cost": 0.0, **state}  # saved before the option: packs of image tokens only
        # A state saved before the content was recorded cannot be compared on it: the other keys still are.
        changed = {k: (state.get(k), v) for k, v in now.items()
                   if state.get(k) != v and (k in state or k != "content")}
        epoch, consumed = int(state["epoch"]), int(state["packs_consumed"])
        self._continue, self._continued = None, None
        if consumed and "packs_done" in state and set(changed) <= {"world_size"}:
            self._continue = {"epoch": epoch, "steps": consumed, "packs_done": int(state["packs_done"]),
                              "world_size": int(state["epoch_world_size"])}
            if changed:
                log.warning("resuming epoch %d after %d steps on %d ranks (the checkpoint's run had %d): the rest of "
                            "the epoch is split over them, every sample still once; a step now trains on %d packs, "
                            "not %d (the schedule stays in steps)", epoch, consumed, world, state["world_size"], world,
                            state["world_size"])
        elif changed and consumed:
            log.warning(
                "data settings changed since the checkpoint (%s, as (saved, now)): the plan of epoch %d differs, so it "
                "restarts from its first pack instead of pack %d (some data of that epoch is seen twice)",
                changed, epoch, consumed,
            )  # fmt: skip
            consumed = 0
        self._resume = (epoch, consumed)
        self._next_epoch = epoch
