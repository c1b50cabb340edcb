"""Prepare bench: images/s and codec calls per image, today's path vs the new pipeline, on an ImageNet-like folder.

python bench/prepare.py [--images 600] [--samples-per-shard 300] [--batch-size 16] [--workers 2] [--repeats 2]
    [--folder DIR]
(from the repository root with PYTHONPATH=. when the installed package is another checkout)

The folder (made here unless --folder names one): JPEGs (quality 90) at ImageNet-like sizes (`data/lengths.py`: 75% with
a long side of 500 px, mostly 4:3 and 3:2) with the procedural content of `synth`, 10 classes. Codec `pixel:32`: the same
latent grid as DC-AE f32 (sides floored to multiples of 32, area capped at 2048²), so the codec calls per image are
what DC-AE would get; the pixel codec itself costs next to nothing, so images/s measures decode, resize and writing.
- today: per shard, windows of `--batch-size` consecutive images decoded in the process, equal sizes of a window
  batched into one codec call (the code before the pipeline, kept below as `today_encode_shard`); "×K processes" is
  today's `--num-workers K`, a spawn pool over shards, each process with its own codec.
- new: `run_prepare` — decode + resize in K DataLoader workers, images of equal size grouped across the whole shard
  into codec calls of `--batch-size`, one codec in this process (one per GPU under torchrun).
Every row must write byte-identical shards (checked: the table says so, and the bench fails otherwise). Runs are
interleaved and repeated; a row reports its fastest repeat (the machine is shared: the others carry its load).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nit_lightning.data.codecs import Codec, codec_from_spec
from nit_lightning.data.imageops import BadImage, apply_mode, image_to_tensor, load_rgb
from nit_lightning.data.lengths import imagenet_like_sizes
from nit_lightning.data.listing import list_labelled_images
from nit_lightning.data.prepare import (
    CLASSES_NAME,
    PLAN_NAME,
    PrepareSettings,
    fingerprint_of,
    plan_record,
    reindex,
    run_prepare,
    shard_name,
    shard_plan,
)
from nit_lightning.data.shards import ShardWriter, sample_members
from nit_lightning.records import write_json
from nit_lightning.data.synthetic import render

CODEC = "pixel:32"


def make_folder(root: Path, num_images: int, seed: int = 0, num_classes: int = 10) -> Path:
    """ImageNet-like JPEGs: sizes from `imagenet_like_sizes`, content from `synth`'s renderer, classes i mod K."""
    sizes = imagenet_like_sizes(num_images, seed)
    for i, (h, w) in enumerate(sizes.tolist()):
        k = i % num_classes
        folder = root / f"c{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = render(k, (h, w), np.random.default_rng([seed, i]))
        Image.fromarray(pixels, "RGB").save(folder / f"{i:07d}.jpg", quality=90)
    return root


class CountingCodec(Codec):
    """A codec that counts its `encode` calls and inputs (the number the new pipeline minimises)."""

    def __init__(self, inner: Codec):
        self.inner, self.factor, self.latent_channels = inner, inner.factor, inner.latent_channels
        self.calls = self.inputs = 0

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs += int(images_B3HW.shape[0])
        return self.inner.encode(images_B3HW)

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents_BChw)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


# ---- today's path: the per-shard loop of data/prepare.py before the pipeline, unchanged but for the codec count ----
def today_encode_shard(shard_id: int, items, settings: PrepareSettings, codec: Codec, fingerprint) -> dict[str, Any]:
    """Windows of batch_size consecutive images: decode here, batch the equal sizes of the window, write."""
    root, out = Path(settings.input), Path(settings.output)
    writer = ShardWriter(out / shard_name(settings.prefix, shard_id))
    skipped, converted, resized = [], [], Counter()
    try:
        for start in range(0, len(items), settings.batch_size):
            ready = []
            for index, rel, cls in items[start : start + settings.batch_size]:
                try:
                    image, conversions = load_rgb(root / rel)
                    image, change = apply_mode(image, settings.mode, codec.factor, settings.max_area)
                except BadImage as error:
                    skipped.append({"source": rel, "reason": error.reason, "detail": error.detail})
                    continue
                if conversions:
                    converted.append({"source": rel, "reasons": conversions})
                resized.update([op.split(" ")[0] for op in change.ops] or ["unchanged"])
                meta = {"source": rel, "orig_size": list(change.orig_hw), "mode": settings.mode,
                        "resize": change.describe(), "converted": conversions}
                ready.append((index, rel, cls, meta, image_to_tensor(image)))
            images = [entry[4] for entry in ready]
            if settings.flip:
                images += [torch.flip(x, dims=[-1]) for x in images]
            latents = codec.encode_list(images, max_batch=settings.batch_size) if images else []
            for j, (index, rel, cls, meta, _) in enumerate(ready):
                latent = latents[j].cpu()
                flip = latents[len(ready) + j].cpu() if settings.flip else None
                members = sample_members(f"{index:08d}", latent, cls, dtype=settings.latent_dtype, latent_flip=flip, meta=meta)
                writer.write(f"{index:08d}", members, int(latent.shape[1] * latent.shape[2]))
    except BaseException:
        writer.abort()
        raise
    return writer.close(extra={"skipped": skipped, "converted": converted, "resized": dict(sorted(resized.items())),
                               "first_index": items[0][0] if items else None, "prepare": fingerprint})


_POOL: dict[str, Any] = {}


def _pool_init(settings: PrepareSettings, fingerprint: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    _POOL.update(settings=settings, fingerprint=fingerprint, codec=CountingCodec(codec_from_spec(settings.codec)))


def _pool_shard(task) -> tuple[int, int]:
    shard_id, items = task
    codec = _POOL["codec"]
    before = codec.calls
    today_encode_shard(shard_id, items, _POOL["settings"], codec, _POOL["fingerprint"])
    return codec.calls - before, len(items)


def run_today(settings: PrepareSettings, processes: int) -> dict[str, Any]:
    """Today's run: plan, then the shards in this process (processes ≤ 1) or a spawn pool; then the index."""
    codec = CountingCodec(codec_from_spec(settings.codec))
    listing = list_labelled_images(settings.input)
    fingerprint = fingerprint_of(settings, codec, listing)
    plan = shard_plan(listing, settings.samples_per_shard)
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CLASSES_NAME, listing.classes, sort_keys=True)
    plan_record(settings, fingerprint, listing, len(plan)).write(out / PLAN_NAME)
    calls = 0
    if processes <= 1:
        for s, items in enumerate(plan):
            today_encode_shard(s, items, settings, codec, fingerprint)
        calls = codec.calls
    else:
        threads = max(1, (multiprocessing.cpu_count() or 1) // processes)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_pool_init,
                                 initargs=(settings, fingerprint, threads)) as pool:
            calls = sum(c for c, _ in pool.map(_pool_shard, list(enumerate(plan))))
    index = reindex(out)
    return {"codec_calls": calls, "images": index["num_samples"]}


def shard_digests(out: Path, prefix: str) -> dict[str, str]:
    """SHA-256 of every shard and sidecar (prepare.json/index.json name the run's own settings: left out)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob(f"{prefix}-*"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--samples-per-shard", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decode workers (new) / processes (today)")
    parser.add_argument("--folder", default=None, help="image folder to use (default: make one in a temp dir)")
    parser.add_argument("--no-flip", action="store_true", help="do not store mirrored latents (default: --flip)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, interleaved; the fastest is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, multiprocessing.cpu_count() // 2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "images"
        if not args.folder:
            start = time.perf_counter()
            make_folder(folder, args.images)
            print(f"made {args.images} ImageNet-like JPEGs in {time.perf_counter() - start:.1f} s")
        count = len(list_labelled_images(folder).items)
        grids = Counter()
        for p in folder.rglob("*.jpg"):
            with Image.open(p) as image:
                h, w = image.height, image.width
            grids[(max(32, h // 32 * 32), max(32, w // 32 * 32))] += 1
        print(f"{count} images, {len(grids)} distinct sizes after flooring to multiples of 32; most common: "
              f"{', '.join(f'{h}x{w} ({n})' for (h, w), n in grids.most_common(4))}")
        runs = [("today", 0, args.batch_size), (f"today ×{args.workers} processes", args.workers, args.batch_size),
                ("new", 0, args.batch_size), ("new", args.workers, args.batch_size),
                ("new", args.workers, 4 * args.batch_size)]
        best: dict[int, dict[str, Any]] = {}
        reference = None
        for repeat in range(args.repeats):
            for i, (name, workers, batch) in enumerate(runs):
                out = Path(tmp) / f"out{i}"
                settings = PrepareSettings(input=str(folder), output=str(out), codec=CODEC, flip=not args.no_flip,
                                           samples_per_shard=args.samples_per_shard, num_workers=workers,
                                           batch_size=batch)
                start = time.perf_counter()
                if name.startswith("today"):
                    result = run_today(settings, workers)
                else:
                    done = run_prepare(settings)
                    result = {"codec_calls": done["codec_calls"], "images": done["index"]["num_samples"]}
                seconds = time.perf_counter() - start
                digests = shard_digests(out, settings.prefix)
                shutil.rmtree(out)  # shards of the pixel codec are large (fp16 of every pixel, twice with flip)
                reference = reference or digests
                row = dict(result, name=name, workers=workers, batch=batch, seconds=seconds,
                           same=digests == reference and best.get(i, {}).get("same", True))
                print(json.dumps({"repeat": repeat, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                       for k, v in row.items()}}), flush=True)
                times = best.get(i, {}).get("all", []) + [seconds]
                if i not in best or seconds < best[i]["seconds"]:
                    best[i] = row
                best[i].update(all=times, same=row["same"])
        rows = [(r["name"], r["workers"], r["batch"], r["images"] / r["seconds"], r["codec_calls"],
                 r["codec_calls"] / r["images"], r["all"], r["same"]) for r in (best[i] for i in sorted(best))]
    print(f"\n{count} images, codec {CODEC}, flip {not args.no_flip}, {args.samples_per_shard} images per shard, "
          f"{multiprocessing.cpu_count()} CPU cores, torch {torch.__version__}")
    print("| path | decode workers / processes | batch | images/s (fastest) | codec calls | calls/image | "
          "seconds (every repeat) | same bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, workers, batch, rate, calls, per_image, seconds, same in rows:
        print(f"| {name} | {workers} | {batch} | {rate:.1f} | {calls} | {per_image:.3f} | "
              f"{' / '.join(f'{t:.1f}' for t in seconds)} | {'yes' if same else 'NO'} |")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
