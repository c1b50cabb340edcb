"""Images -> latent shards (SPEC §4): sorted listing, fixed image->shard plan, resumable, rank- and process-parallel."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nit_lightning import distributed
from nit_lightning.data.codecs import Codec, codec_from_spec
from nit_lightning.data.imageops import (
    BadImage,
    apply_mode,
    default_max_area,
    image_to_tensor,
    load_rgb,
    parse_mode,
)
from nit_lightning.data.listing import Listing, list_labelled_images
from nit_lightning.data.shards import (
    LATENT_DTYPES,
    ShardFormatError,
    ShardWriter,
    build_index,
    sample_members,
    shard_is_complete,
    sidecar_path,
    write_json_atomic,
)

log = logging.getLogger(__name__)
PLAN_NAME = "prepare.json"
CLASSES_NAME = "classes.json"


@dataclass
class PrepareSettings:
    """Options of `python -m nit_lightning prepare`; those marked (bytes) decide the shards' content."""

    input: str
    output: str
    mode: str = "native"  # (bytes) native | fixed-256 | fixed-512
    codec: str = "pixel:8"  # (bytes) pixel:F | dcae:PATH_OR_ID
    codec_dtype: str = "float32"  # (bytes) compute dtype of DC-AE
    labels: str | None = None  # flat folder + "filename<TAB or comma>class" file
    flip: bool = False  # (bytes) also store the latent of the mirrored image
    samples_per_shard: int = 1000  # (bytes) the image -> shard plan
    num_workers: int = 0  # processes over shards (0: in this process)
    dtype: str = "float16"  # (bytes) storage dtype of latents
    device: str = "cpu"
    prefix: str = "shard"
    batch_size: int = 16  # images decoded + encoded at once (equal sizes share a codec call)
    max_area: int | None = None  # (bytes) native area cap; None: (64·factor)², 2048² for DC-AE


def shard_name(prefix: str, shard_id: int) -> str:
    return f"{prefix}-{shard_id:06d}.tar"


def _fingerprint(settings: PrepareSettings, codec: Codec, listing: Listing) -> dict[str, Any]:
    """What decides the bytes of every shard; a resumed run must match it exactly.

    `files_sha1` is the identity (path, size, mtime) of every input file: another folder with the same file names, or
    files rewritten in place, cannot resume into shards made from the old ones. The input's path itself is recorded in
    prepare.json but not compared, so that a folder moved with its times (mv, rsync -a) still resumes."""
    return {
        "codec": codec.describe(), "mode": settings.mode, "dtype": settings.dtype, "flip": settings.flip,
        "samples_per_shard": settings.samples_per_shard, "max_area": settings.max_area, "prefix": settings.prefix,
        "num_items": len(listing.items), "listing_sha1": listing.digest(), "files_sha1": listing.files_digest(),
    }


# What a difference in a digest means, for the message that refuses a rerun.
_DIGESTS = {
    "listing_sha1": "listing_sha1 (images added, removed or relabelled)",
    "files_sha1": "files_sha1 (another input folder, or input files rewritten since: their sizes or times differ)",
}


def describe_differences(recorded: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """'prefix 'shard' -> 'other', files_sha1 (…)': every key whose value differs, old -> new where that is short."""
    recorded = recorded or {}
    parts = []
    for key in sorted(set(now) | set(recorded)):
        old, new = recorded.get(key), now.get(key)
        if old == new:
            continue
        parts.append(_DIGESTS.get(key) or (f"{key} {old!r} -> {new!r}" if key not in recorded or
                                           len(repr(old)) + len(repr(new)) < 120 else key))
    return ", ".join(parts)


def encode_shard(
    shard_id: int, items: list[tuple[int, str, int]], settings: PrepareSettings, codec: Codec, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """Write one shard of (global index, relative path, class) items; bad images are skipped and recorded, not raised."""
    root, out = Path(settings.input), Path(settings.output)
    writer = ShardWriter(out / shard_name(settings.prefix, shard_id))
    skipped, converted, resized = [], [], Counter()
    try:
        for start in range(0, len(items), settings.batch_size):
            ready = []  # (index, rel, cls, meta, x_3HW)
            for index, rel, cls in items[start : start + settings.batch_size]:
                try:
                    image, conversions = load_rgb(root / rel)
                    image, change = apply_mode(image, settings.mode, codec.factor, settings.max_area)
                except BadImage as error:
                    skipped.append({"source": rel, "reason": error.reason, "detail": error.detail})
                    log.warning("skipped %s (%s: %s)", rel, error.reason, error.detail)
                    continue
                if conversions:
                    converted.append({"source": rel, "reasons": conversions})
                resized.update([op.split(" ")[0] for op in change.ops] or ["unchanged"])
                meta = {"source": rel, "orig_size": list(change.orig_hw), "mode": settings.mode,
                        "resize": change.describe(), "converted": conversions}
                ready.append((index, rel, cls, meta, image_to_tensor(image)))
            images = [entry[4] for entry in ready]
            if settings.flip:  # the mirror of the resized image, so that both latents share one geometry
                images += [torch.flip(x, dims=[-1]) for x in images]
            latents = codec.encode_list(images, max_batch=settings.batch_size) if images else []
            for j, (index, rel, cls, meta, _) in enumerate(ready):
                latent = latents[j].cpu()
                flip = latents[len(ready) + j].cpu() if settings.flip else None
                if not torch.isfinite(latent).all() or (flip is not None and not torch.isfinite(flip).all()):
                    skipped.append({"source": rel, "reason": "non-finite-latent", "detail": "codec output has NaN/Inf"})
                    log.warning("skipped %s (non-finite latent)", rel)
                    continue
                members = sample_members(f"{index:08d}", latent, cls, dtype=settings.dtype, latent_flip=flip, meta=meta)
                writer.write(f"{index:08d}", members, int(latent.shape[1] * latent.shape[2]))
    except BaseException:
        writer.abort()
        raise
    return writer.close(extra={"skipped": skipped, "converted": converted, "resized": dict(sorted(resized.items())),
                               "first_index": items[0][0] if items else None, "prepare": fingerprint})


def _plan(listing: Listing, samples_per_shard: int) -> list[list[tuple[int, str, int]]]:
    """Image i goes to shard i // samples_per_shard: fixed by the sorted listing, so resuming is exact."""
    numbered = [(i, rel, cls) for i, (rel, cls) in enumerate(listing.items)]
    return [numbered[s : s + samples_per_shard] for s in range(0, len(numbered), samples_per_shard)]


# Worker processes: one codec each, built once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _worker_init(settings: PrepareSettings, fingerprint: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(settings=settings, fingerprint=fingerprint,
                   codec=codec_from_spec(settings.codec, settings.codec_dtype, settings.device))


def _worker_shard(task: tuple[int, list[tuple[int, str, int]]]) -> tuple[int, str | None, float]:
    shard_id, items = task
    start = time.perf_counter()
    try:
        encode_shard(shard_id, items, _WORKER["settings"], _WORKER["codec"], _WORKER["fingerprint"])
        return shard_id, None, time.perf_counter() - start
    except Exception as error:  # reported by the parent; the shard stays unfinished and a rerun redoes it
        return shard_id, f"{type(error).__name__}: {error}", time.perf_counter() - start


def run_prepare(settings: PrepareSettings) -> dict[str, Any]:
    """Encode this rank's unfinished shards; write index.json when every shard of the plan is complete."""
    if settings.dtype not in LATENT_DTYPES:
        raise ValueError(f"--dtype {settings.dtype!r} is not one of {LATENT_DTYPES}")
    if settings.samples_per_shard < 1 or settings.batch_size < 1:
        raise ValueError(
            f"samples_per_shard {settings.samples_per_shard} and batch_size {settings.batch_size} must be ≥ 1"
        )
    ranks = distributed.from_environment()
    rank, world = ranks.rank, ranks.world
    settings.device = str(distributed.device_for(settings.device, ranks.local_rank))
    codec = codec_from_spec(settings.codec, settings.codec_dtype, settings.device)
    parse_mode(settings.mode, codec.factor)  # a bad mode fails before any work
    if settings.max_area is not None and settings.max_area < codec.factor**2:
        raise ValueError(
            f"--max-area {settings.max_area} is below one latent pixel ({codec.factor}² = {codec.factor**2} pixels); "
            f"it caps the pixel area of `native` images: leave it out for the default "
            f"(64·{codec.factor})² = {default_max_area(codec.factor)}"
        )
    if settings.num_workers < 0:
        raise ValueError(f"--num-workers {settings.num_workers} must be ≥ 0")
    listing = list_labelled_images(settings.input, settings.labels)
    if not listing.items:
        raise ValueError(
            f"no usable images in {settings.input} "
            f"({len(listing.skipped)} skipped, {len(listing.ignored)} non-image files)"
        )
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(settings, codec, listing)
    plan = _plan(listing, settings.samples_per_shard)
    _check_existing(out, settings.prefix, fingerprint, len(plan))
    # Every rank writes the same two files (atomic replace), so no rank waits for another.
    write_json_atomic(out / CLASSES_NAME, listing.classes)
    write_json_atomic(out / PLAN_NAME, {"settings": asdict(settings), "fingerprint": fingerprint,
                                        "num_shards": len(plan), "num_classes": len(listing.classes),
                                        "listing_skipped": listing.skipped, "ignored_files": listing.ignored})
    for entry in listing.skipped:
        log.warning("skipped %s (%s: %s)", entry["source"], entry["reason"], entry["detail"])
    mine = [s for s in range(len(plan)) if s % world == rank]
    todo = [s for s in mine if not shard_is_complete(out / shard_name(settings.prefix, s))]
    log.info("rank %d/%d: %d shards of %d are mine, %d already complete, %d to encode", rank, world, len(mine),
             len(plan), len(mine) - len(todo), len(todo))
    failed = _encode_all(todo, plan, settings, codec, fingerprint)
    complete = all(shard_is_complete(out / shard_name(settings.prefix, s)) for s in range(len(plan)))
    index = reindex(out) if complete else None
    if not complete:
        log.info("not every shard is finished yet: the last rank to finish writes index.json (or run `prepare --reindex`)")
    return {"rank": rank, "world": world, "num_shards": len(plan), "encoded": len(todo) - len(failed),
            "already_complete": len(mine) - len(todo), "failed": failed, "index": index}


def _encode_all(todo: list[int], plan, settings: PrepareSettings, codec: Codec, fingerprint) -> dict[int, str]:
    """Encode shards in this process or a spawn pool; a failing shard is reported and left unfinished, never fatal."""
    failed: dict[int, str] = {}
    if settings.num_workers <= 1 or len(todo) <= 1:
        for s in todo:
            start = time.perf_counter()
            try:
                sidecar = encode_shard(s, plan[s], settings, codec, fingerprint)
            except Exception as error:
                failed[s] = f"{type(error).__name__}: {error}"
                log.error("shard %d failed: %s (rerun prepare to retry it)", s, failed[s])
                continue
            log.info("shard %d: %d written, %d skipped, %.1f s", s, sidecar["num_samples"], len(sidecar["skipped"]),
                     time.perf_counter() - start)
        return failed
    workers = min(settings.num_workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)  # 16 cores / 4 workers = 4 intra-op threads each
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads / CUDA
    with context.Pool(workers, initializer=_worker_init, initargs=(settings, fingerprint, threads)) as pool:
        for s, error, seconds in pool.imap_unordered(_worker_shard, [(s, plan[s]) for s in todo]):
            if error is not None:
                failed[s] = error
                log.error("shard %d failed: %s (rerun prepare to retry it)", s, error)
            else:
                log.info("shard %d done in %.1f s", s, seconds)
    return failed


def _check_existing(out: Path, prefix: str, fingerprint: dict[str, Any], num_shards: int) -> None:
    """Finished shards must come from the same settings and input files, and the folder may hold no other shards."""
    _refuse_foreign_shards(out, [shard_name(prefix, s) for s in range(num_shards)])
    for tar in sorted(out.glob(f"{prefix}-" + "[0-9]" * 6 + ".tar")):
        if not shard_is_complete(tar):
            continue
        recorded = json.loads(sidecar_path(tar).read_text()).get("prepare")
        if recorded != fingerprint:
            raise ValueError(
                f"{tar} was written with other settings or input files; differs in: "
                f"{describe_differences(recorded, fingerprint)}; use a new --output directory, or delete the old "
                f"shards to re-encode"
            )


def _refuse_foreign_shards(out: Path, names: list[str]) -> None:
    """One folder holds one prepare run: a tar outside the plan (another --prefix, a larger old plan) is refused, so
    that no index and no reader ever mixes two runs."""
    planned = set(names)
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in planned)
    if foreign:
        raise ValueError(
            f"{out} holds {len(foreign)} shards that are not part of this plan of {len(names)} shards "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}): they come from another run (another "
            f"--prefix, or more images before); use a new --output directory, or delete them"
        )


def reindex(output: str | Path) -> dict[str, Any]:
    """Merge the sidecars into index.json with the run's settings and the counts of skipped/converted images."""
    out = Path(output)
    plan_path = out / PLAN_NAME
    if not plan_path.exists():
        raise FileNotFoundError(f"{plan_path} is missing: {out} was not written by `prepare`")
    plan = json.loads(plan_path.read_text())
    fingerprint, num_shards = plan["fingerprint"], plan["num_shards"]
    prefix = fingerprint["prefix"]
    missing = [shard_name(prefix, s) for s in range(num_shards) if not shard_is_complete(out / shard_name(prefix, s))]
    if missing:
        raise ShardFormatError(f"{len(missing)} of {num_shards} shards are unfinished ({missing[:5]}...): rerun prepare")
    skipped, converted, resized, written = list(plan["listing_skipped"]), [], Counter(), 0
    for s in range(num_shards):
        sidecar = json.loads(sidecar_path(out / shard_name(prefix, s)).read_text())
        written += sidecar["num_samples"]
        if sidecar.get("prepare") != fingerprint:
            raise ShardFormatError(f"{shard_name(prefix, s)} was written with other settings than {PLAN_NAME}")
        skipped += sidecar["skipped"]
        converted += sidecar["converted"]
        resized.update(sidecar["resized"])
    codec = fingerprint["codec"]
    settings = {
        "codec": codec, "latent_channels": codec["latent_channels"], "factor": codec["factor"],
        "mode": fingerprint["mode"], "dtype": fingerprint["dtype"], "flip": fingerprint["flip"],
        "samples_per_shard": fingerprint["samples_per_shard"], "num_classes": plan["num_classes"],
        "source": plan["settings"]["input"],
        "counts": {
            "listed": fingerprint["num_items"] + len(plan["listing_skipped"]),
            "written": written,
            "skipped": dict(sorted(Counter(e["reason"] for e in skipped).items())),
            "converted": dict(sorted(Counter(r for e in converted for r in e["reasons"]).items())),
            "resized": dict(sorted(resized.items())),
            "ignored_files": len(plan["ignored_files"]),
        },
        "skipped": skipped, "converted": converted, "ignored_files": plan["ignored_files"],
    }
    if written + len(skipped) != settings["counts"]["listed"]:  # every listed file is written or skipped, once
        raise ShardFormatError(f"{written} written + {len(skipped)} skipped != {settings['counts']['listed']} listed")
    if written == 0:  # no index: a folder without samples must not look prepared (the demo reuses any index.json)
        reasons = ", ".join(f"{reason}: {n}" for reason, n in settings["counts"]["skipped"].items())
        raise ValueError(
            f"prepare wrote 0 samples: all {settings['counts']['listed']} listed images were skipped ({reasons}); "
            f"each file's reason is in {out / PLAN_NAME} and the sidecars {prefix}-*.json"
        )
    names = [shard_name(prefix, s) for s in range(num_shards)]
    _refuse_foreign_shards(out, names)
    return build_index(out, settings, names=names)
