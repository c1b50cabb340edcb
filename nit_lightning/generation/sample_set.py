"""Sample sets on disk: class-balanced images per size -> PNGs + one ADM npz, resumable, rank-sliced, with provenance.

Layout of one size: DIR/<HxW>/<index:06d>.png, DIR/<HxW>/samples_<N>x<H>x<W>x3.npz (arr_0 uint8 NHWC, arr_1 labels),
DIR/<HxW>/provenance.json (which weights, sampler and seed made them: a resume with anything else is refused, naming
the difference) and DIR/<HxW>/done.json (written last). Image i has label i mod num_classes and seed
derive_seed(seed, i); rank r of W makes images r, r + W, ...: the set is the same on any number of GPUs.
DIR/grid.png shows the run: one row per size, the first image of each class (at most 16) per column.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nit_lightning import distributed
from nit_lightning.data.imageops import read_rgb
from nit_lightning.data.sizes import format_size, validate_size
from nit_lightning.generation.grid import class_columns, write_grid
from nit_lightning.generation.images import class_balanced, generate
from nit_lightning.generation.pipeline import Pipeline, load_pipeline
from nit_lightning.generation.recipe import MAX_DEFAULT_SAMPLES, PAPER_PROTOCOL, default_num_samples, resolve_sampler
from nit_lightning.generation.settings import SizeSetting, upgrade_sampler_record
from nit_lightning.records import SettingsRecord, folder_lock, read_json, write_json, write_with

log = logging.getLogger(__name__)
UINT8_RULE = "clamp(round((x+1)*127.5),0,255), round half to even"


@dataclass
class SampleRun:
    """Everything `run_sample` needs: a checkpoint, where to write, and what to sample: one SizeSetting per size
    (`settings`, e.g. a sweep file), or `sizes` sampled with the sampler resolved from `sampler_flags` over the
    checkpoint's recipe over the defaults (generation/recipe.py)."""

    ckpt: str
    out: str
    settings: list[SizeSetting] = field(default_factory=list)
    num_samples: int | None = None  # per size, exactly; None: one per class, at most 16 (a grid to look at)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    sampler_flags: dict[str, Any] = field(default_factory=dict)  # sampler keys given by the user
    rope_interp: bool = True  # False: no RoPE interpolation beyond the trained range unless a flag sets a side
    grid: bool = True  # write DIR/grid.png
    seed: int = 0
    tokens_per_forward: int = 16384  # model tokens per forward; CFG's null branch counts twice
    codec: str | None = None  # "dcae:PATH" / "pixel:F" / "tinyae:PATH"; default: the checkpoint's codec
    rope_layout: str | None = None
    device: str = "auto"  # auto = cuda:LOCAL_RANK when available, else cpu
    save_png: bool = True  # False: PNGs are only the resumable store, removed once the npz is complete
    use_ema: bool = True
    round: str | None = None  # None: a size that is not a multiple is an error; "nearest" / "floor": round and log
    progress: bool = True


def run_sample(run: SampleRun, pipeline: Pipeline | None = None) -> dict[str, Path]:
    """Load the pipeline once (unless given) and write every size's set and the grid; returns {"HxW": npz path}."""
    if (run.num_samples is not None and run.num_samples < 1) or run.tokens_per_forward < 1:
        raise ValueError(f"num_samples ({run.num_samples}) and tokens_per_forward ({run.tokens_per_forward}) must be >= 1")
    if not run.settings and not run.sizes:
        raise ValueError("no sizes to sample: give at least one setting")
    ranks = distributed.current()  # the command opened the process group of a multi-rank run (cli/sample.py)
    device = distributed.device_for(run.device, ranks.local_rank)
    # One run per output folder (rank 0 holds the lock for all ranks: they write disjoint images of one set).
    with folder_lock(run.out, "sample", enabled=ranks.is_main):
        pipe = pipeline or load_pipeline(run.ckpt, use_ema=run.use_ema, rope_layout=run.rope_layout, device=device,
                                         codec=run.codec)
        if pipe.conditioning == "text":
            raise ValueError(f"{run.ckpt} is a text-to-image (NiT-T2I) checkpoint: sample it with --prompts FILE "
                             "(one prompt per line, or JSONL with prompt, height, width, seed)")
        settings, num = resolve_run(run, pipe)
        out: dict[str, Path] = {}
        for setting in settings:
            setting = dataclasses.replace(setting, size=validate_size(setting.size, pipe.size_multiple, round=run.round))
            out[setting.name] = write_sample_set(pipe, setting, Path(run.out) / setting.name, num=num,
                                                 seed=run.seed, tokens_per_forward=run.tokens_per_forward, ranks=ranks,
                                                 save_png=run.save_png, progress=run.progress, source=run.ckpt)
        if run.grid and ranks.is_main:
            path = write_sample_grid(Path(run.out) / "grid.png", out, int(pipe.net.config.num_classes),
                                     title=f"{Path(run.ckpt).name}: {_sampler_title(settings)}")
            log.info("grid of the samples: %s", path)
        return out


def resolve_run(run: SampleRun, pipeline: Pipeline) -> tuple[list[SizeSetting], int]:
    """The settings and the number of samples per size; logs where every value came from."""
    num = run.num_samples
    if num is None:
        num = default_num_samples(pipeline.net.config.num_classes)
        log.info("num_samples %d (default: one per class, at most %d; the paper's protocol: %s)", num,
                 MAX_DEFAULT_SAMPLES, PAPER_PROTOCOL)
    if run.settings:
        if run.sampler_flags:
            raise ValueError(f"sampler flags {sorted(run.sampler_flags)} and explicit settings (a sweep file) "
                             "contradict each other: give one")
        return list(run.settings), num
    resolved = resolve_sampler(run.sampler_flags, pipeline.record.recipe, rope_interp=run.rope_interp)
    log.info("sampler (flag > checkpoint recipe > default): %s", "; ".join(resolved.describe()))
    return [SizeSetting(size, resolved.sampler) for size in run.sizes], num


def _sampler_title(settings: list[SizeSetting]) -> str:
    described = {s.sampler.describe() for s in settings}
    return described.pop() if len(described) == 1 else "per-size samplers"


def write_sample_grid(path: Path, sets: dict[str, Path], num_classes: int, title: str | None = None) -> Path:
    """One row per size (the sets' npz files), the first image of each class per column (at most 16 classes)."""
    rows = []
    count = None
    for name, npz in sets.items():
        images = first_images(npz, MAX_DEFAULT_SAMPLES)
        count = len(images) if count is None else count
        rows.append((name, list(images[:num_classes])))
    return write_grid(path, rows, class_columns(num_classes, count or 0), title)


def first_images(npz: Path, n: int) -> np.ndarray:
    """The first n images (n, H, W, 3) of an ADM npz, read without loading the rest (a 50k set is gigabytes)."""
    with zipfile.ZipFile(npz) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        take = min(int(n), int(shape[0]))
        count = take * int(np.prod(shape[1:]))
        return np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count).reshape(take, *shape[1:])


def write_sample_set(pipeline: Pipeline, setting: SizeSetting, folder: Path, *, num: int, seed: int = 0,
                     tokens_per_forward: int = 16384, ranks: distributed.Ranks = distributed.Ranks(),
                     save_png: bool = True, progress: bool = False, source: str | None = None) -> Path:
    """Make this rank's missing images of one setting; rank 0 then writes the npz. Returns the npz path."""
    folder.mkdir(parents=True, exist_ok=True)
    device = next(pipeline.net.parameters()).device
    setting = dataclasses.replace(setting, sampler=setting.sampler.for_device(device))  # provenance: what really runs
    h, w = setting.size
    npz = folder / f"samples_{num}x{h}x{w}x3.npz"
    check_provenance(folder, provenance(pipeline, setting, seed, source), ranks.is_main)
    done = folder / "done.json"
    finished = npz.exists() and done.exists() and read_json(done, "sample-set record").get("num_samples") == num
    # Kept PNGs are the truth: a deleted PNG is regenerated and the npz rebuilt; with --no-png the npz is the record.
    if finished and (not save_png or all(png_path(folder, i).exists() for i in range(num))):
        log.info("%s: complete (%s), nothing to do", folder, npz.name)
        return npz
    if done.exists() and ranks.is_main:
        done.unlink()
    mine = range(ranks.rank, num, ranks.world)  # strided: every rank gets the same mix of classes
    todo = [i for i in mine if not png_path(folder, i).exists()]
    num_classes = int(pipeline.net.config.num_classes)
    requests = class_balanced(todo, setting.size, num_classes, seed)
    log.info("%s: rank %d/%d makes %d images with %s (%d kept from before)", folder.name, ranks.rank, ranks.world,
             len(todo), setting.sampler.describe(), len(mine) - len(todo))
    start = time.perf_counter()
    # PNG encoding runs in threads (zlib releases the GIL) while the next pack samples; at most 2 packs in flight.
    with _progress(progress and ranks.is_main) as bar, ThreadPoolExecutor(max_workers=4) as pool:
        task = bar.add_task(f"{setting.name} {setting.sampler.describe()}", total=len(todo))
        pending: list[Future] = []
        for batch in generate(pipeline, requests, setting.sampler, tokens_per_forward=tokens_per_forward):
            for future in pending:
                future.result()  # re-raises a failed write
            pending = [pool.submit(write_png, image, png_path(folder, r.index))
                       for r, image in zip(batch.requests, batch.images)]
            bar.advance(task, len(batch.requests))
        for future in pending:
            future.result()
    if todo:
        seconds = time.perf_counter() - start
        log.info("%s: rank %d made %d images in %.1f s = %.2f images/s", setting.name, ranks.rank, len(todo), seconds,
                 len(todo) / seconds)
    distributed.barrier()
    if ranks.is_main:
        missing = [i for i in range(num) if not png_path(folder, i).exists()]
        if missing:
            raise RuntimeError(f"{folder}: {len(missing)} of {num} PNGs missing after sampling (first: {missing[:5]})")
        write_adm_npz(npz, folder, num, setting.size, np.arange(num) % num_classes)
        write_json(done, {"num_samples": num, "npz": npz.name})
        if not save_png:
            for i in range(num):
                png_path(folder, i).unlink()
        log.info("%s: wrote %s", folder, npz)
    distributed.barrier()
    return npz


# ---- provenance --------------------------------------------------------------------------------------------------
PROVENANCE_NAME = "provenance.json"
INFORMATIONAL = ("source", "weights")  # recorded, but a moved or renamed checkpoint with the same weights may resume
LABELS = {"weights_sha256": "weights_sha256 (another model: other weights)"}


def provenance(pipeline: Pipeline, setting: SizeSetting, seed: int, source: str | None) -> SettingsRecord:
    """What decides every pixel of the set (compared on resume), plus where the weights were read from (recorded)."""
    return SettingsRecord("sample-set", settings={
        "weights_sha256": pipeline.meta.get("weights_sha256"), "sampler": setting.sampler.as_dict(), "seed": seed,
        "size": setting.name, "codec": pipeline.codec.describe(), "num_classes": int(pipeline.net.config.num_classes),
        "label_rule": "i mod num_classes", "uint8_rule": UINT8_RULE,
    }, info={"source": str(Path(source).resolve()) if source else None, "weights": pipeline.meta.get("weights")})


def check_provenance(folder: Path, record: SettingsRecord, is_main: bool) -> None:
    """Refuse to add images to a folder that another model or other settings started; rank 0 writes the record."""
    record.check(folder / PROVENANCE_NAME, what="samples", labels=LABELS, ignore=set(INFORMATIONAL), write=is_main,
                 remedy=f"use another --out or delete {folder}", upgrade=_upgrade)


def _upgrade(recorded: dict[str, Any]) -> dict[str, Any]:
    """A provenance record of an older spelling (sampler `dtype`, precision `fp32`) in today's words."""
    sampler = recorded.get("sampler")
    return {**recorded, "sampler": upgrade_sampler_record(sampler)} if isinstance(sampler, dict) else recorded


# ---- files -------------------------------------------------------------------------------------------------------
def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def write_png(image_3HW: torch.Tensor, path: Path) -> None:
    """Atomic write (temporary file, then rename): a PNG that exists is complete, so resuming can trust it."""
    from PIL import Image

    image = Image.fromarray(image_3HW.permute(1, 2, 0).numpy())
    write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def read_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    array = read_rgb(path)
    if array.shape != (size[0], size[1], 3):
        raise ValueError(f"{path} is {array.shape[0]}x{array.shape[1]}, expected {format_size(size)}; delete it to "
                         "regenerate")
    return array


def write_adm_npz(path: Path, folder: Path, n: int, size: tuple[int, int], labels: np.ndarray) -> Path:
    """ADM npz (arr_0 uint8 (n, H, W, 3), arr_1 int64 labels) streamed from PNGs: memory of one image, not n."""
    h, w = size

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, 3)})
                for i in range(n):
                    f.write(np.ascontiguousarray(read_png(png_path(folder, i), size)).tobytes())
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)

    return write_with(path, write)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)
