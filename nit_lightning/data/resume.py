"""The rest of an epoch on another number of ranks: a run resumed on fewer or more processes continues exactly.

An epoch's packs come from one packing (`Packing`, LPFHP order); a plan for W ranks trains them in that order, W per
step, less the P mod W least-full ones (so that every rank gets as many). After some steps, everything before a
position of the packing has been trained on or dropped and nothing after it touched (`EpochPlan.packs_done_after`).
The rest of the epoch on W' ranks is the packing from that position on, less the least-full that do not divide by W':
every sample of the epoch is trained on once or dropped with its pack, never twice. On the world size the epoch was
planned for it is exactly the rest of the original plan (the P mod W least-full of the whole packing that lie after
the position are the least-full of what is left), so one code path serves every resume.
"""
from __future__ import annotations

import logging

import numpy as np

from nit_lightning.data.epochs import EpochPlan

log = logging.getLogger(__name__)


def continue_plan(plan: EpochPlan, *, packs_done: int, first_step: int, world_size: int,
                  packs_per_epoch: int | None = None, tokens_per_pack: int = 0) -> EpochPlan:
    """The rest of `plan`'s epoch on `world_size` ranks, after `first_step` steps that used its packs up to position
    `packs_done`: the packs from there on, in the same order, less the least-full ones that do not divide evenly.

    Every sample of the epoch is then trained on once or dropped with its pack (logged), never twice; on the world
    size the epoch was planned for, the result is exactly the rest of `plan`.
    """
    full = plan.packing
    rest = np.arange(packs_done, len(full.offsets) - 1)
    keep = np.ones(rest.size, dtype=bool)
    keep[np.argsort(full.fill[rest], kind="stable")[: rest.size % world_size]] = False
    kept = rest[keep]
    per_rank = kept.size // world_size
    if packs_per_epoch is not None:  # an epoch is packs_per_epoch steps, whatever the world size
        per_rank = min(per_rank, max(packs_per_epoch - first_step, 0))
        kept = kept[: per_rank * world_size]
    take, offsets, _ = full.take(kept)
    dropped = rest[~keep]
    unused = int(rest.size - dropped.size - kept.size)
    report = {"selected_samples": int(full.ids.size), "planned_packs": int(rest.size),
              "leftover_packs": int(dropped.size), "leftover_samples": int(np.diff(full.offsets)[dropped].sum()),
              "leftover_tokens": full.image_tokens(dropped), "packs_per_rank": first_step + per_rank,
              "kept_samples": int(take.size), "kept_tokens": int(full.tokens[take].sum()),
              "kept_cost": int(full.fill[kept].sum()), "unused_packs": unused}  # cost: + caption cost, if set
    log.log(
        logging.WARNING if world_size != plan.base_world else logging.INFO,
        "epoch %d continues on %d ranks after %d steps (planned for %d ranks): %d packs left -> %d more steps; "
        "dropped the %d least-full (%d samples) so every rank gets the same count%s; no sample of the epoch is seen "
        "twice", plan.epoch, world_size, first_step, plan.base_world, rest.size, per_rank, dropped.size,
        report["leftover_samples"], f", {unused} unused (packs_per_epoch={packs_per_epoch})" if unused else "",
    )  # fmt: skip
    efficiency = report["kept_cost"] / (kept.size * tokens_per_pack) if kept.size and tokens_per_pack else 0.0
    return EpochPlan(plan.epoch, world_size, full.ids[take], offsets, full.flips[take], full.tokens[take],
                     first_step + per_rank, efficiency, report, packing=full, kept=kept, first_step=first_step,
                     first_pack=packs_done, base_world=plan.base_world)
