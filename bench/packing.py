"""Packing bench: LPFHP vs pad-to-longest vs greedy next-fit vs aspect-ratio buckets, and data-loader throughput.

python bench/packing.py [--samples 384000] [--big 3800000] [--loader-samples 3000]
Efficiency = real tokens / (steps × token budget): the share of each step's token budget that is real image tokens.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nit_lightning.data import shards
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.data.lengths import recipe_grids
from nit_lightning.data.packing import lpfhp_flat

LONGEST = 4096  # largest recipe image: 64×64 latent tokens
BUCKETS = np.array([1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0, 3.0])  # h/w of the aspect buckets


def lpfhp_steps(lengths: np.ndarray, budget: int) -> int:
    return len(lpfhp_flat(lengths, budget, seed=0)[1]) - 1


def pad_to_longest_steps(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """Batches of a fixed image count B = budget // 4096 (the largest image must fit), each padded to its longest."""
    per_batch = budget // LONGEST  # 2 at 8192, 16 at 65536
    order = rng.permutation(lengths)
    steps = -(-order.size // per_batch)
    padded = np.pad(order, (0, steps * per_batch - order.size)).reshape(steps, per_batch)
    return steps, int((padded.max(axis=1) * per_batch).sum())  # computed tokens incl. padding


def next_fit_steps(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> int:
    """Greedy next-fit in random order: close the pack when the next image does not fit."""
    steps, used = 1, 0
    for length in rng.permutation(lengths).tolist():
        if used + length > budget:
            steps, used = steps + 1, 0
        used += length
    return steps


def bucket_steps(grids: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """Aspect-ratio buckets: each image goes to the nearest h/w bucket (log distance); a batch holds images of one
    bucket, as many as fit when padded to the longest image so far (pad-in-bucket: no resizing, native sizes kept)."""
    ratio = grids[:, 0] / grids[:, 1]
    bucket = np.abs(np.log(ratio)[:, None] - np.log(BUCKETS)[None, :]).argmin(axis=1)
    lengths = grids[:, 0] * grids[:, 1]
    steps, computed = 0, 0
    for b in range(len(BUCKETS)):
        longest, count = 0, 0
        for length in rng.permutation(lengths[bucket == b]).tolist():
            if max(longest, length) * (count + 1) > budget:
                steps, computed = steps + 1, computed + longest * count
                longest, count = 0, 0
            longest, count = max(longest, length), count + 1
        if count:
            steps, computed = steps + 1, computed + longest * count
    return steps, computed


def efficiency_table(num: int) -> None:
    grids = recipe_grids(num, seed=0)
    lengths = grids[:, 0] * grids[:, 1]
    real = int(lengths.sum())
    print(f"\n## Packing efficiency, recipe mixture ({num:,} samples: 1/3 native ImageNet-like, 1/3 64, 1/3 256)")
    print("| budget | method | steps | real / budget | real / computed | time (s) |")
    print("|---|---|---|---|---|---|")
    for budget in (8192, 16384, 65536):
        rows = []
        rng = np.random.default_rng(0)
        began = time.perf_counter()
        steps = lpfhp_steps(lengths, budget)
        rows.append(("LPFHP", steps, steps * budget, time.perf_counter() - began))
        began = time.perf_counter()
        steps, computed = pad_to_longest_steps(lengths, budget, rng)
        rows.append((f"pad-to-longest (B={budget // LONGEST})", steps, computed, time.perf_counter() - began))
        began = time.perf_counter()
        steps = next_fit_steps(lengths, budget, rng)
        rows.append(("greedy next-fit", steps, steps * budget, time.perf_counter() - began))
        began = time.perf_counter()
        steps, computed = bucket_steps(grids, budget, rng)
        rows.append((f"AR buckets ({len(BUCKETS)}, pad in bucket)", steps, computed, time.perf_counter() - began))
        for name, steps, computed, seconds in rows:
            row = f"| {budget} | {name} | {steps:,} | {real / (steps * budget):.2%} | {real / computed:.2%} |"
            print(f"{row} {seconds:.3f} |")


def speed_table(num: int) -> None:
    lengths = recipe_grids(num, seed=1).prod(axis=1)
    print(f"\n## LPFHP time, {num:,} lengths (numpy, index arrays; best of 3 runs: the CPU is shared)")
    print("| budget | packs | efficiency | time (s) |")
    print("|---|---|---|---|")
    for budget in (8192, 16384, 65536):
        seconds = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            indices, offsets = lpfhp_flat(lengths, budget, seed=0)
            seconds = min(seconds, time.perf_counter() - began)
        packs = len(offsets) - 1
        print(f"| {budget} | {packs:,} | {lengths.sum() / (packs * budget):.3%} | {seconds:.2f} |")


def write_shards(directory: Path, num: int, channels: int = 32, per_shard: int = 500) -> None:
    """DC-AE-like float16 latents (32 channels) of recipe sizes, with their mirror, like `prepare` writes."""
    grids = recipe_grids(num, seed=2)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, num, per_shard):
        writer = shards.ShardWriter(directory / f"bench-{start // per_shard:06d}.tar")
        for i in range(start, min(start + per_shard, num)):
            h, w = (int(v) for v in grids[i])
            latent = torch.randn(channels, h, w, generator=generator).half()
            writer.write(f"s{i}", shards.sample_members(f"s{i}", latent, i % 1000, latent_flip=latent.flip(-1)), h * w)
        writer.close()
    shards.build_index(directory, {"latent_channels": channels, "codec": None})


def loader_table(num: int, budget: int = 16384) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), num)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.tar"))
        print(f"\n## Data-loader throughput ({num:,} samples, 32-ch float16 latents + flips, {size / 2**20:.0f} MiB "
              f"in {len(list(Path(tmp).glob('*.tar')))} shards, budget {budget})")  # fmt: skip
        print("| workers | packs | packs/s | images/s | tokens/s |")
        print("|---|---|---|---|---|")
        for workers in (0, 2):
            dm = NativeLatentDataModule(
                sources=[{"path": tmp}], tokens_per_pack=budget, num_workers=workers, buffer_size=0
            )
            dm.override_distributed(0, 1)
            for _ in dm.train_dataloader():
                pass
            stats = dm.stats["train"]
            print(f"| {workers} | {stats.packs} | {stats.packs / stats.seconds:.1f} | {stats.samples_per_s:,.0f} | "
                  f"{stats.tokens_per_s:,.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--samples", type=int, default=384_000, help="samples for the method comparison")
    parser.add_argument("--big", type=int, default=3_800_000, help="samples for the LPFHP timing (3 × ImageNet)")
    parser.add_argument("--loader-samples", type=int, default=3000, help="samples written to temporary shards")
    args = parser.parse_args()
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    efficiency_table(args.samples)
    speed_table(args.big)
    loader_table(args.loader_samples)


if __name__ == "__main__":
    main()
