"""ADM reference batches (npz: arr_0, mu, sigma, mu_s, sigma_s + our metadata) and building them from image folders.

Build protocol for a target H x W (any resolution or aspect ratio; equal to ADM's `center_crop_arr` when H == W):
  1. images: every image file under the folder (recursive, data/listing.py suffixes), sorted by relative path, as RGB;
  2. while the image is at least twice the target on both sides (min(w/W, h/H) >= 2): halve it with a box filter;
  3. scale s = max(H/h, W/w) (the short side relative to the target covers it), bicubic resize to
     (round(w·s), round(h·s));
  4. centre crop H x W at top = (h' - H) // 2, left = (w' - W) // 2.
Statistics (mu, sigma, mu_s, sigma_s) are over ALL images; arr_0 is a seeded subset (numpy default_rng(seed).choice
without replacement, kept in file order) used for precision/recall.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from nit_lightning.data.imageops import open_rgb
from nit_lightning.data.listing import list_images
from nit_lightning.data.sizes import format_size
from nit_lightning.evaluation.arrays import nhwc_to_tensor, open_npz
from nit_lightning.evaluation.extractors import FeatureExtractor
from nit_lightning.evaluation.metrics import ADMFeatureStats
from nit_lightning.records import SettingsRecord, write_with
from nit_lightning.records.files import check_output_file
from nit_lightning.records.names import WEIGHTS_DOCS

log = logging.getLogger(__name__)

META_KEY = "nit_meta"  # JSON text in a 0-d unicode array (loads without pickle; ADM's evaluator ignores it)
POOL_KEY = "arr_0_pool"  # pool features of arr_0 by the recorded extractor (saves recomputing them per evaluation)
ADM_ASSUMED_EXTRACTOR = "inception-2015-12-05"
PROTOCOL = ("box-halve while min(w/W, h/H) >= 2; bicubic resize by max(H/h, W/w) with round(); centre crop "
            "((h'-H)//2, (w'-W)//2); files sorted by relative path")


@dataclass
class Reference:
    """One reference batch: statistics over the whole set, a subset of images, and who made it."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    images: np.ndarray | None = None  # arr_0 (M, H, W, 3) uint8
    pool: np.ndarray | None = None  # (M, F) features of arr_0 by meta["extractor"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def extractor(self) -> str:
        return str(self.meta.get("extractor", ADM_ASSUMED_EXTRACTOR))

    def stats(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma, "mu_s": self.mu_s, "sigma_s": self.sigma_s}


def save_reference(path: str | Path, ref: Reference) -> None:
    """Write an ADM-compatible npz (atomically: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {key: np.asarray(value, np.float64) for key, value in ref.stats().items()}
    if ref.images is not None:
        arrays["arr_0"] = np.asarray(ref.images, np.uint8)
    if ref.pool is not None:
        arrays[POOL_KEY] = np.asarray(ref.pool, np.float32)
    arrays[META_KEY] = np.array(json.dumps(ref.meta, sort_keys=True))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(handle, **arrays)

    write_with(path, write)


def reference_record(extractor_name: str, size: tuple[int, int], *, subset: int, seed: int,
                     source: str | Path) -> SettingsRecord:
    """What decides a reference built here (compared before a rebuild overwrites one)."""
    return SettingsRecord("reference", settings={
        "extractor": extractor_name, "size": list(size), "subset": int(subset), "seed": int(seed),
        "source": os.path.realpath(source), "protocol": PROTOCOL})


def check_reference_output(path: str | Path, record: SettingsRecord) -> None:
    """Before building: `path` must be writable, and an existing reference there must have the same settings."""
    path = check_output_file(path)
    if path.is_file():
        meta = load_reference(path, load_images=False).meta
        record.refuse_if_different({k: meta.get(k) for k in record.settings}, where=path, what="a reference",
                                   remedy="use another --out, or delete it to rebuild")


def load_reference(path: str | Path, *, load_images: bool = True) -> Reference:
    """Read an ADM npz (ours or a public one); a public file without metadata is assumed to be Inception's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {str(path)!r} not found; build one with `python -m nit_lightning "
                                "reference build --images DIR --size HxW --out REF.npz`, or for 256x256 / 512x512 "
                                f"download ADM's ({WEIGHTS_DOCS})")
    with open_npz(path, "an ADM reference batch") as data:
        missing = [key for key in ("mu", "sigma", "mu_s", "sigma_s") if key not in data.files]
        if missing:
            raise KeyError(f"{str(path)!r} lacks {missing}: not an ADM reference batch (keys {data.files})")
        broken = [key for key in ("mu", "sigma", "mu_s", "sigma_s") if not np.isfinite(data[key]).all()]
        if broken:
            raise ValueError(f"reference {str(path)!r}: {broken} hold NaN or Inf; rebuild it with `reference build`")
        meta = json.loads(str(data[META_KEY])) if META_KEY in data.files else {}
        if not meta:
            log.warning("%s has no %s record: assuming a public ADM batch made with %s", path, META_KEY,
                        ADM_ASSUMED_EXTRACTOR)
            meta = {"extractor": ADM_ASSUMED_EXTRACTOR, "source": "ADM (no metadata; extractor assumed)"}
        images = data["arr_0"] if load_images and "arr_0" in data.files else None
        pool = data[POOL_KEY] if POOL_KEY in data.files else None
        if images is not None and "size" not in meta:
            meta["size"] = [int(images.shape[1]), int(images.shape[2])]
        return Reference(mu=data["mu"], sigma=data["sigma"], mu_s=data["mu_s"], sigma_s=data["sigma_s"],
                         images=images, pool=pool, meta=meta)


def fit_to_size(image: "Image.Image", height: int, width: int) -> np.ndarray:  # noqa: F821
    """The reference protocol (module docstring): box-halve, bicubic cover-resize, centre crop -> (H, W, 3) uint8."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.width / width, image.height / height) >= 2:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    arr = np.asarray(image, dtype=np.uint8)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return arr[top:top + height, left:left + width]


def _load_fit(path: Path, height: int, width: int) -> np.ndarray:
    return fit_to_size(open_rgb(path), height, width)


def iter_folder_batches(files: list[Path], size: tuple[int, int], batch_size: int = 64,
                        num_workers: int = 2) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 batches of the files brought to `size` by the protocol, in file order."""
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            yield np.stack(list(pool.map(lambda p: _load_fit(p, *size), chunk)))


def build_reference(images_dir: str | Path, size: tuple[int, int], extractor: FeatureExtractor, *,
                    subset: int = 10000, seed: int = 0, batch_size: int = 64, num_workers: int = 2) -> Reference:
    """Statistics over every image of the folder at `size`, arr_0 = a seeded subset of `subset` images."""
    files = list_images(images_dir)
    n = len(files)
    if subset <= 0:
        raise ValueError(f"--subset {subset} must be positive (arr_0 is needed for precision/recall)")
    if subset > n:
        log.warning("subset %d > %d images in %s: arr_0 holds all %d", subset, n, images_dir, n)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(subset, n), replace=False))
    keep = np.zeros(n, dtype=bool)
    keep[chosen] = True
    # every image of the folder is read here: no sync with other ranks (which may not be computing statistics)
    stats = ADMFeatureStats(extractor.dims["pool"], extractor.dims["spatial"], keep_rows=False, sync_on_compute=False)
    kept_images, kept_pool = [], []
    for b, batch in enumerate(iter_folder_batches(files, size, batch_size, num_workers)):
        feats = extractor(nhwc_to_tensor(batch))
        stats.update(feats)
        mask = keep[b * batch_size:b * batch_size + len(batch)]
        kept_images.append(batch[mask])
        kept_pool.append(feats["pool"][torch.from_numpy(mask)].numpy())
        if (b + 1) % 20 == 0:
            log.info("reference %s: %d / %d images", format_size(size), b * batch_size + len(batch), n)
    result = stats.compute()
    meta = {**reference_record(extractor.name, size, subset=subset, seed=seed, source=images_dir).settings,
            "num_images": n, "kept": int(len(chosen)), "feature_dims": dict(extractor.dims)}
    return Reference(mu=result["mu"], sigma=result["sigma"], mu_s=result["mu_s"], sigma_s=result["sigma_s"],
                     images=np.concatenate(kept_images), pool=np.concatenate(kept_pool), meta=meta)


def reference_pool(ref: Reference, extractor: FeatureExtractor) -> torch.Tensor:
    """Pool features of arr_0: the cached ones when made by this extractor, else computed now."""
    if ref.pool is not None and ref.meta.get("extractor") == extractor.name and ref.pool.shape[1] == extractor.dims[
            "pool"]:
        return torch.from_numpy(np.asarray(ref.pool, np.float32))
    if ref.images is None:
        raise ValueError("the reference has no arr_0 images: precision/recall cannot be computed")
    feats = [extractor(nhwc_to_tensor(ref.images[i:i + 256]))["pool"] for i in range(0, len(ref.images), 256)]
    return torch.cat(feats)


def check_extractor(ref: Reference, extractor: FeatureExtractor, ref_path: str | Path = "") -> None:
    """Samples and reference must be measured by the same network: anything else is an error."""
    if ref.extractor != extractor.name:
        raise ValueError(f"reference {str(ref_path)!r} was made with features {ref.extractor!r} but the samples are "
                         f"measured with {extractor.name!r}; pass the matching --features or rebuild the reference")
    if np.asarray(ref.mu).shape[0] != extractor.dims["pool"] or np.asarray(ref.mu_s).shape[0] != extractor.dims[
            "spatial"]:
        raise ValueError(f"reference {str(ref_path)!r} has {np.asarray(ref.mu).shape[0]}/{np.asarray(ref.mu_s).shape[0]}"
                         f"-dim statistics, the extractor gives {extractor.dims}")
