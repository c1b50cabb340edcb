"""Images -> latent shards (SPEC §4): sorted listing, fixed image->shard plan, resumable, rank-parallel; decoding in
worker processes and equal sizes batched per shard (data/encode.py)."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nit_lightning import distributed
from nit_lightning.data.caption_tokens import (CaptionCounter, caption_counter_for, caption_sidecar,
                                                 count_captions)
from nit_lightning.data.captions import caption_kind, list_captioned_images
from nit_lightning.data.codecs import Codec, codec_from_spec
from nit_lightning.data.encode import BucketEncoder, DecodeDataset, ShardState, encode_shards
from nit_lightning.data.imageops import default_max_area, parse_mode
from nit_lightning.data.listing import Listing, list_labelled_images
from nit_lightning.data.shards import (
    LATENT_DTYPES,
    ShardFormatError,
    ShardWriter,
    build_index,
    sample_members,
    shard_is_complete,
    sidecar_path,
)
from nit_lightning.records import SettingsRecord, folder_lock
from nit_lightning.records.names import check_dtype_name
from nit_lightning.records.files import read_json, write_json

log = logging.getLogger(__name__)
PLAN_NAME = "prepare.json"
CLASSES_NAME = "classes.json"


@dataclass
class PrepareSettings:
    """Options of `python -m nit_lightning prepare`; those marked (bytes) decide the shards' content."""

    input: str
    output: str
    mode: str = "native"  # (bytes) native | fixed-256 | fixed-512
    codec: str = "pixel:8"  # (bytes) pixel:F | dcae:PATH_OR_ID | tinyae:PATH
    codec_dtype: str = "float32"  # (bytes) compute dtype of DC-AE
    labels: str | None = None  # flat folder + "filename<TAB or comma>class" file
    flip: bool = False  # (bytes) also store the latent of the mirrored image
    samples_per_shard: int = 1000  # (bytes) the image -> shard plan
    num_workers: int = 0  # decode + resize processes feeding this process's one codec (0: decode here)
    latent_dtype: str = "float16"  # (bytes) storage dtype of the latents (index.json / sidecars: "dtype")
    device: str = "cpu"
    prefix: str = "shard"
    batch_size: int = 16  # codec inputs per call (an image and its mirror count two); equal sizes of a shard
    max_area: int | None = None  # (bytes) native area cap; None: (64·factor)², 2048² for DC-AE
    captions: str | None = None  # (bytes) "beside" (photo.txt) | a JSONL manifest path | None: class-conditional
    missing_caption: str = "skip"  # (bytes) an image without a caption: skip (counted "no-caption") | empty ("")
    text_encoder: str | None = None  # (index) hf:PATH | tinytext:PATH: count each caption's tokens for packing


def shard_name(prefix: str, shard_id: int) -> str:
    return f"{prefix}-{shard_id:06d}.tar"


def fingerprint_of(settings: PrepareSettings, codec: Codec, listing: Listing,
                   counter: CaptionCounter | None = None) -> dict[str, Any]:
    """What decides the bytes of every shard; a resumed run must match it exactly.

    `files_sha1` is the identity (path, size, mtime) of every input file: another folder with the same file names, or
    files rewritten in place, cannot resume into shards made from the old ones. The input's path itself is recorded in
    prepare.json but not compared, so that a folder moved with its times (mv, rsync -a) still resumes."""
    return {
        "codec": codec.describe(), "mode": settings.mode, "dtype": settings.latent_dtype, "flip": settings.flip,
        "samples_per_shard": settings.samples_per_shard, "max_area": settings.max_area, "prefix": settings.prefix,
        "num_items": len(listing.items), "listing_sha1": listing.digest(), "files_sha1": listing.files_digest(),
        # the sidecars' caption token counts depend on the tokenizer (absent without one: older folders still resume)
        **({"caption_tokenizer": counter.describe()} if counter is not None else {}),
    }


# What a difference in a digest means, for the message that refuses a rerun.
DIGEST_LABELS = {
    "listing_sha1": "listing_sha1 (images added, removed, relabelled or recaptioned)",
    "files_sha1": "files_sha1 (another input folder, or input files rewritten since: their sizes or times differ)",
}
REMEDY = "use a new --output directory, or delete the old shards to re-encode"


def plan_record(settings: PrepareSettings, fingerprint: dict[str, Any], listing: Listing, num_shards: int
                ) -> SettingsRecord:
    """prepare.json: the fingerprint is compared; the options, the plan's size and what was skipped are recorded."""
    return SettingsRecord("prepare", settings=fingerprint, info={
        "options": asdict(settings), "num_shards": num_shards, "num_classes": len(listing.classes),
        "listing_skipped": listing.skipped, "ignored_files": listing.ignored,
        "captions": caption_kind(settings.captions), "empty_captions": listing.empty_captions})


def read_plan(out: Path) -> SettingsRecord:
    """The folder's prepare.json (also the format before records: {"settings", "fingerprint", ...} at the top)."""
    path = out / PLAN_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {out} was not written by `prepare`")
    content = read_json(path, "prepare plan")
    if isinstance(content, dict) and "fingerprint" in content:
        info = {k: v for k, v in content.items() if k not in ("settings", "fingerprint")}
        return SettingsRecord("prepare", settings=content["fingerprint"], info={"options": content["settings"], **info})
    return SettingsRecord.read(path, "prepare")


def shard_plan(listing: Listing, samples_per_shard: int) -> list[list[tuple[int, str, int]]]:
    """Image i goes to shard i // samples_per_shard: fixed by the sorted listing, so resuming is exact."""
    numbered = [(i, rel, cls) for i, (rel, cls) in enumerate(listing.items)]
    return [numbered[s : s + samples_per_shard] for s in range(0, len(numbered), samples_per_shard)]


def run_prepare(settings: PrepareSettings) -> dict[str, Any]:
    """Encode this rank's unfinished shards; write index.json when every shard of the plan is complete."""
    check_dtype_name(settings.latent_dtype, LATENT_DTYPES, "--latent-dtype")
    if settings.samples_per_shard < 1 or settings.batch_size < 1:
        raise ValueError(
            f"samples_per_shard {settings.samples_per_shard} and batch_size {settings.batch_size} must be ≥ 1"
        )
    ranks = distributed.from_environment()
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
    counter = caption_counter_for(settings.text_encoder, settings.captions)  # a bad spec fails before any work
    listing = _listing(settings)
    if not listing.items:
        raise ValueError(
            f"no usable images in {settings.input} "
            f"({len(listing.skipped)} skipped, {len(listing.ignored)} non-image files)"
        )
    # One prepare run per output folder: a second one would write shards of other settings beside these (rank 0 holds
    # the lock for the ranks of its own run, which write disjoint shards).
    with folder_lock(settings.output, "prepare", enabled=ranks.is_main):
        return _prepare(settings, codec, listing, ranks, counter)


def _listing(settings: PrepareSettings) -> Listing:
    """Class folders, a flat folder + labels file, or a captioned folder (data/captions.py: class 0, no labels)."""
    if settings.captions is None:
        if settings.missing_caption != "skip":
            raise ValueError(f"--missing-caption {settings.missing_caption} is for captioned folders: pass --captions "
                             f"beside or --captions MANIFEST.jsonl too")
        return list_labelled_images(settings.input, settings.labels)
    if settings.labels is not None:
        raise ValueError(f"--labels {settings.labels} and --captions {settings.captions} exclude each other: a "
                         f"captioned folder has no classes (every image is class 0); leave one out")
    listing = list_captioned_images(settings.input, settings.captions, settings.missing_caption)
    if listing.empty_captions:
        log.warning("%d images have no caption and are kept with the empty caption (--missing-caption empty)",
                    listing.empty_captions)
    return listing


def _prepare(settings: PrepareSettings, codec: Codec, listing: Listing, ranks: distributed.Ranks,
             counter: CaptionCounter | None = None) -> dict[str, Any]:
    rank, world = ranks.rank, ranks.world
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint_of(settings, codec, listing, counter)
    plan = shard_plan(listing, settings.samples_per_shard)
    record = plan_record(settings, fingerprint, listing, len(plan))
    _check_existing(out, record, len(plan))
    # Every rank writes the same two files (atomic replace), so no rank waits for another.
    write_json(out / CLASSES_NAME, listing.classes, sort_keys=True)
    record.write(out / PLAN_NAME)
    for entry in listing.skipped:
        log.warning("skipped %s (%s: %s)", entry["source"], entry["reason"], entry["detail"])
    mine = [s for s in range(len(plan)) if s % world == rank]
    todo = [s for s in mine if not shard_is_complete(out / shard_name(settings.prefix, s))]
    log.info("rank %d/%d: %d shards of %d are mine, %d already complete, %d to encode", rank, world, len(mine),
             len(plan), len(mine) - len(todo), len(todo))
    encoded = _encode_all(todo, plan, settings, codec, fingerprint, listing.captions, counter)
    failed = encoded["failed"]
    complete = all(shard_is_complete(out / shard_name(settings.prefix, s)) for s in range(len(plan)))
    index = reindex(out) if complete else None
    if not complete:
        log.info("not every shard is finished yet: the last rank to finish writes index.json (or run `prepare --reindex`)")
    return {"rank": rank, "world": world, "num_shards": len(plan), "encoded": len(todo) - len(failed),
            "already_complete": len(mine) - len(todo), "failed": failed, "index": index,
            "codec_calls": encoded["codec_calls"], "images_encoded": encoded["images_encoded"]}


def _encode_all(todo: list[int], plan, settings: PrepareSettings, codec: Codec, fingerprint,
                captions: list[str] | None, counter: CaptionCounter | None = None) -> dict[str, Any]:
    """Encode this rank's unfinished shards (data/encode.py); a failing shard is reported and left unfinished."""
    out = Path(settings.output)
    items = [(s, index, rel, cls) for s in todo for index, rel, cls in plan[s]]
    dataset = DecodeDataset(items, settings.input, settings.mode, codec.factor, settings.max_area)
    encoder = BucketEncoder(codec, settings.batch_size, settings.flip, settings.device)
    counts = count_captions(counter, captions, [index for _, index, _, _ in items])  # {listing index: tokens} | None

    def to_members(decoded, latent, mirror) -> tuple[str, dict[str, bytes], int]:
        key = f"{decoded.index:08d}"
        # The caption joins here, in this process: the decode workers never hold the texts (SAM: ~5 GB of them).
        meta = decoded.meta if captions is None else {**decoded.meta, "caption": captions[decoded.index]}
        members = sample_members(key, latent, decoded.cls, dtype=settings.latent_dtype, latent_flip=mirror, meta=meta)
        return key, members, int(latent.shape[1] * latent.shape[2])

    def finish(state: ShardState) -> None:
        sidecar = close_shard(state, fingerprint, caption_sidecar(counts, state.writer.keys))
        log.info("shard %d: %d written, %d skipped, %.1f s", state.shard, sidecar["num_samples"],
                 len(sidecar["skipped"]), time.perf_counter() - state.started)

    failed = encode_shards(dataset, {s: len(plan[s]) for s in todo}, encoder, settings.num_workers,
                           lambda s: ShardWriter(out / shard_name(settings.prefix, s)), to_members, finish)
    return {"failed": failed, "codec_calls": encoder.calls, "images_encoded": encoder.images}


def close_shard(state: ShardState, fingerprint: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finish a shard's tar and write its sidecar (last: a tar without its sidecar counts as unfinished)."""
    return state.writer.close(extra={**state.sidecar_records(), "prepare": fingerprint, **(extra or {})})


def _check_existing(out: Path, record: SettingsRecord, num_shards: int) -> None:
    """The folder and every finished shard must come from the same settings and input files; no other shards."""
    prefix = record.settings["prefix"]
    _refuse_foreign_shards(out, [shard_name(prefix, s) for s in range(num_shards)])
    if (out / PLAN_NAME).exists():
        record.refuse_if_different(read_plan(out).settings, where=f"{out} (see its {PLAN_NAME})", what="shards",
                                   remedy=REMEDY, labels=DIGEST_LABELS)
    for tar in sorted(out.glob(f"{prefix}-" + "[0-9]" * 6 + ".tar")):
        if shard_is_complete(tar):  # a shard's sidecar carries the fingerprint it was written with
            record.refuse_if_different(read_json(sidecar_path(tar), "shard sidecar").get("prepare"), where=tar,
                                       what="samples", remedy=REMEDY, labels=DIGEST_LABELS)


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
    plan = read_plan(out)
    fingerprint, num_shards = plan.settings, plan.info["num_shards"]
    prefix = fingerprint["prefix"]
    missing = [shard_name(prefix, s) for s in range(num_shards) if not shard_is_complete(out / shard_name(prefix, s))]
    if missing:
        raise ShardFormatError(f"{len(missing)} of {num_shards} shards are unfinished ({missing[:5]}...): rerun prepare")
    skipped, converted, resized, written = list(plan.info["listing_skipped"]), [], Counter(), 0
    for s in range(num_shards):
        sidecar = read_json(sidecar_path(out / shard_name(prefix, s)), "shard sidecar")
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
        "samples_per_shard": fingerprint["samples_per_shard"], "num_classes": plan.info["num_classes"],
        "source": plan.info["options"]["input"],
        "captions": plan.info.get("captions"),  # "beside" | "manifest": each sample's json has "caption"; None: C2I
        # the text encoder whose tokenizer counted each shard's "caption_tokens" (prepare --text-encoder); None: none
        "caption_tokenizer": fingerprint.get("caption_tokenizer"),
        "counts": {
            "listed": fingerprint["num_items"] + len(plan.info["listing_skipped"]),
            "written": written,
            "skipped": dict(sorted(Counter(e["reason"] for e in skipped).items())),
            "converted": dict(sorted(Counter(r for e in converted for r in e["reasons"]).items())),
            "resized": dict(sorted(resized.items())),
            "ignored_files": len(plan.info["ignored_files"]),
            **({"empty_captions": plan.info["empty_captions"]} if plan.info.get("captions") else {}),
        },
        "skipped": skipped, "converted": converted, "ignored_files": plan.info["ignored_files"],
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
