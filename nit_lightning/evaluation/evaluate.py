"""Evaluate generated images against a reference batch: sample sets on disk (npz or PNG folder) or images made in memory.

`evaluate_samples` reads a set written by `sample`; `sample_feature_stats` makes one rank's share of a set with the
generation iterator and keeps only its feature statistics (the evaluation callback during training).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nit_lightning import distributed
from nit_lightning.data.imageops import read_rgb
from nit_lightning.data.listing import list_images
from nit_lightning.data.sizes import format_size
from nit_lightning.evaluation.arrays import nhwc_to_tensor, open_npz
from nit_lightning.evaluation.extractors import FeatureExtractor, is_reference_grade
from nit_lightning.evaluation.metrics import ADMFeatureStats, compare
from nit_lightning.evaluation.reference import Reference, check_extractor, load_reference, reference_pool
from nit_lightning.evaluation.sample_prompts import PROMPTS_FILE, read_sample_prompts
from nit_lightning.generation.images import class_balanced, generate
from nit_lightning.generation.pipeline import Pipeline
from nit_lightning.generation.settings import SizeSetting

NOT_INCEPTION = "features are NOT the FID Inception: numbers are not comparable to published ones"


def iter_sample_batches(path: str | Path, batch_size: int = 64) -> tuple[Iterator[np.ndarray], int, tuple[int, int]]:
    """A sample set (ADM npz with arr_0 NHWC uint8, or a folder of PNGs) -> (batches, count, (H, W))."""
    path = Path(path)
    if path.is_dir():
        # A prompted folder (`sample --prompts`) is the images its prompts.jsonl lists; any other folder, every image.
        prompted = (path / PROMPTS_FILE).is_file()
        files = [r.file for r in read_sample_prompts(path)] if prompted else list_images(path)
        size = read_rgb(files[0]).shape[:2]

        def folder_batches() -> Iterator[np.ndarray]:
            for start in range(0, len(files), batch_size):
                arrays = []
                for f in files[start:start + batch_size]:
                    a = read_rgb(f)
                    if a.shape[:2] != size:
                        raise ValueError(f"sample {f} is {a.shape[0]}x{a.shape[1]} but {files[0].name} is "
                                         f"{size[0]}x{size[1]}: a sample set must have one size")
                    arrays.append(a)
                yield np.stack(arrays)

        return folder_batches(), len(files), size
    if not path.is_file():
        raise FileNotFoundError(f"samples {str(path)!r} not found (an ADM .npz with arr_0, or a folder of PNGs)")
    with open_npz(path, "ADM samples with arr_0") as data:
        if "arr_0" not in data.files:
            raise KeyError(f"{str(path)!r} has no arr_0 (keys {data.files}); expected ADM samples (N, H, W, 3) uint8")
        images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(path)!r} arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return batches, int(images.shape[0]), (int(images.shape[1]), int(images.shape[2]))


def evaluate_batches(batches: Iterator[np.ndarray], ref: Reference, extractor: FeatureExtractor, *,
                     ref_path: str | Path = "", pr_dtype: torch.dtype = torch.float32, pr_block: int = 10000,
                     expected: int | None = None) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall of uint8 NHWC batches against a reference."""
    check_extractor(ref, extractor, ref_path)
    # The whole set is read by this one process: no sync. Under torchrun/srun (sweep --sizes ... sharded) only rank 0
    # evaluates while the others sample the next setting; a sync here would wait for them forever.
    stats = ADMFeatureStats(extractor.dims["pool"], extractor.dims["spatial"], keep_rows=True, sync_on_compute=False)
    start = time.time()
    for batch in batches:
        stats.update(extractor(nhwc_to_tensor(batch)))
    sample_stats = stats.compute()
    if expected is not None and sample_stats["n"] != expected:
        raise RuntimeError(f"read {sample_stats['n']} samples but expected {expected}")
    result = compare(sample_stats, ref.stats(), reference_pool(ref, extractor), pr_block=pr_block,
                     pr_dtype=pr_dtype)
    result.update({"features": extractor.name, "reference": str(ref_path), "reference_meta": ref.meta,
                   "seconds": round(time.time() - start, 2)})
    if not is_reference_grade(extractor.name):
        result["warning"] = NOT_INCEPTION
    return result


def evaluate_samples(samples: str | Path, ref_path: str | Path, extractor: FeatureExtractor, *,
                     batch_size: int = 64, pr_dtype: torch.dtype = torch.float32,
                     allow_size_mismatch: bool = False) -> dict[str, Any]:
    """Evaluate a sample npz/folder against REF.npz; the sample size must equal the reference size."""
    ref = load_reference(ref_path)
    batches, count, size = iter_sample_batches(samples, batch_size)
    ref_size = tuple(ref.meta.get("size", ()))
    if ref_size and tuple(ref_size) != size and not allow_size_mismatch:
        raise ValueError(f"samples are {format_size(size)} but reference {str(ref_path)!r} is "
                         f"{format_size(ref_size)}; use the reference of that size (or --allow-size-mismatch)")
    result = evaluate_batches(batches, ref, extractor, ref_path=ref_path, pr_dtype=pr_dtype, expected=count)
    result.update({"samples": str(samples), "size": list(size)})
    return result


@torch.no_grad()
def sample_feature_stats(pipeline: Pipeline, setting: SizeSetting, extractor: FeatureExtractor, *, num: int,
                         seed: int = 0, ranks: distributed.Ranks = distributed.Ranks(), tokens_per_forward: int = 16384,
                         device: torch.device | str = "cpu") -> ADMFeatureStats:
    """This rank's share (images rank, rank + world, ...) of a class-balanced set of `num`, as feature statistics."""
    requests = class_balanced(range(ranks.rank, num, ranks.world), setting.size, int(pipeline.net.config.num_classes),
                              seed)
    stats = ADMFeatureStats(extractor.dims["pool"], extractor.dims["spatial"], keep_rows=True).to(device)
    for batch in generate(pipeline, requests, setting.sampler, tokens_per_forward=tokens_per_forward, device=device):
        stats.update({k: v.to(device) for k, v in extractor(torch.stack(batch.images)).items()})
    return stats
