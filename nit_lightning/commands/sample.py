"""`python -m nit_lightning sample`: class-balanced samples per size -> PNGs + one ADM npz per size; resumable, multi-GPU.

Layout: DIR/<HxW>/<index:06d>.png, DIR/<HxW>/samples_<N>x<H>x<W>x3.npz (arr_0 uint8 NHWC, arr_1 labels),
DIR/<HxW>/settings.json (what made them: a resume with other settings is refused), DIR/<HxW>/done.json.
Image i has label i mod num_classes and seed derive_seed(seed, i): the set is the same on any number of GPUs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nit_lightning import distributed
from nit_lightning.data.sizes import (
    METHODS, ROUND_MODES, SweepSetting, format_size, load_sweep, parse_interval, parse_sizes, validate_size,
)
from nit_lightning.diffusion.sampling import SampleRequest, derive_seed, plan_sample_packs, sample_pack

log = logging.getLogger(__name__)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SampleSettings:
    """Everything `run_sample` needs; `sweep` (per-size solver settings) replaces sizes + the solver fields when given."""

    ckpt: str
    out: str
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(256, 256)])
    num_samples: int = 50_000  # per size, exactly
    method: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    tokens_per_pack: int = 16384
    codec: str | None = None  # "dcae:PATH" / "pixel:F"; default: the codec recorded in the checkpoint
    rope_layout: str | None = None
    device: str = "auto"  # auto = cuda:LOCAL_RANK when available, else cpu
    save_png: bool = True  # False: PNGs are the resumable store, removed once the npz is complete
    use_ema: bool = True
    round: str | None = None  # None: invalid sizes are an error; "nearest" / "floor": round and log
    precision: str = "fp32"  # model compute: fp32 / bf16 / fp16 (autocast)
    dtype: str = "float64"  # integration dtype of the sampler
    sweep: list[SweepSetting] | None = None
    progress: bool = True

    def jobs(self) -> list[SweepSetting]:
        if self.sweep is not None:
            return list(self.sweep)
        return [SweepSetting(size=s, method=self.method, steps=self.steps, cfg_scale=self.cfg_scale,
                             cfg_interval=self.cfg_interval) for s in self.sizes]


# ---- files ------------------------------------------------------------------------------------------------------
def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def save_png(image_3HW: torch.Tensor, path: Path) -> None:
    """Atomic write (tmp + rename): a PNG that exists is complete, so resuming can trust it."""
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image_3HW.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    if array.shape != (size[0], size[1], 3):
        raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {size[1]}x{size[0]}; delete it to regenerate")
    return array


def write_adm_npz(path: Path, folder: Path, n: int, size: tuple[int, int], labels: np.ndarray) -> Path:
    """ADM npz (arr_0 uint8 (n, H, W, 3), arr_1 int64 labels) streamed from PNGs: memory of one image, not n."""
    h, w = size
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, 3)})
            for i in range(n):
                f.write(np.ascontiguousarray(read_png(png_path(folder, i), size)).tobytes())
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)
    os.replace(tmp, path)
    return path


def _check_settings(folder: Path, record: dict[str, Any], rank: int) -> None:
    """Refuse to mix samples of different settings in one folder; rank 0 writes the record."""
    path = folder / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{folder} holds samples made with other settings {diff} (old, new); use another --out")
    elif rank == 0:
        path.write_text(json.dumps(record, indent=1))


# ---- the run ------------------------------------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def run_sample(settings: SampleSettings, generator: Any = None) -> dict[str, Path]:
    """Generate exactly num_samples images per size (skipping existing PNGs); returns {"HxW": npz path}."""
    from nit_lightning.generation.pipeline import load_pipeline

    if settings.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {settings.num_samples}")
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype {settings.dtype!r} is not one of {sorted(DTYPES)}")
    ranks = distributed.from_environment()
    rank, world = ranks.rank, ranks.world
    device = distributed.device_for(settings.device, ranks.local_rank)
    with distributed.process_group(ranks, device):
        gen = generator or load_pipeline(settings.ckpt, use_ema=settings.use_ema, rope_layout=settings.rope_layout,
                                          device=device, codec=settings.codec)
        out: dict[str, Path] = {}
        for job in settings.jobs():
            size = validate_size(job.size, gen.size_multiple, round=settings.round)
            out[format_size(size)] = _run_job(job, size, gen, settings, device, rank, world)
        return out


def _run_job(
    job: SweepSetting, size: tuple[int, int], gen: Any, settings: SampleSettings, device: torch.device, rank: int, world: int
) -> Path:
    m, n = gen.size_multiple, settings.num_samples
    grid = (size[0] // m, size[1] // m)
    num_classes = int(gen.net.config.num_classes)
    folder = Path(settings.out) / format_size(size)
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"samples_{n}x{size[0]}x{size[1]}x3.npz"
    record = {"method": job.method, "steps": job.steps, "cfg_scale": job.cfg_scale, "cfg_interval": list(job.cfg_interval),
              "seed": settings.seed, "ckpt": str(Path(settings.ckpt).resolve()), "weights": gen.meta.get("weights"),
              "codec": gen.codec.describe(), "precision": settings.precision, "dtype": settings.dtype,
              "num_classes": num_classes, "label_rule": "i mod num_classes", "uint8_rule": "clamp(round((x+1)*127.5),0,255)"}
    _check_settings(folder, record, rank)
    done = folder / "done.json"
    finished = npz.exists() and done.exists() and json.loads(done.read_text()).get("num_samples") == n
    # Kept PNGs are the truth: a deleted PNG is regenerated and the npz rebuilt; with --no-png the npz is the record.
    if finished and (not settings.save_png or all(png_path(folder, i).exists() for i in range(n))):
        log.info("%s: complete (%s), nothing to do", folder, npz.name)
        return npz
    if done.exists() and rank == 0:
        done.unlink()
    todo = [i for i in range(rank, n, world) if not png_path(folder, i).exists()]  # strided: balanced per rank
    requests = [SampleRequest(i, grid, i % num_classes, derive_seed(settings.seed, i)) for i in todo]
    # With scale ≠ 1 the null branch doubles the sequence inside the interval: plan packs for the doubled size.
    packs = plan_sample_packs(requests, settings.tokens_per_pack, cfg=job.cfg_scale != 1.0)
    kept = len(range(rank, n, world)) - len(todo)
    log.info("%s: rank %d/%d generates %d images in %d packs (%d kept from before)", folder.name, rank, world,
             len(todo), len(packs), kept)
    start, made = time.perf_counter(), 0
    # PNG encoding runs in threads (zlib releases the GIL) while the next pack samples; at most 2 packs in flight.
    with _progress(settings.progress and rank == 0) as bar, ThreadPoolExecutor(max_workers=4) as pool:
        task = bar.add_task(f"{format_size(size)} {job.method}{job.steps} cfg {job.cfg_scale}", total=len(todo))
        pending: list[Future] = []
        for pack in packs:
            x = sample_pack(gen.model_fn(settings.precision), pack, gen.token_dim, device=device, method=job.method,
                            steps=job.steps, cfg_scale=job.cfg_scale, cfg_interval=job.cfg_interval,
                            null_class=gen.net.null_class, dtype=DTYPES[settings.dtype])
            hw = torch.tensor([list(r.hw) for r in pack])
            for future in pending:
                future.result()  # re-raises a failed write
            pending = [pool.submit(save_png, image, png_path(folder, r.index)) for r, image in zip(pack, gen.decode(x, hw))]
            made += len(pack)
            bar.advance(task, len(pack))
        for future in pending:
            future.result()
    elapsed = time.perf_counter() - start
    if made:
        print(f"{format_size(size)}: rank {rank} made {made} images in {elapsed:.1f} s = {made / elapsed:.2f} images/s")
    distributed.barrier()
    if rank == 0:
        missing = [i for i in range(n) if not png_path(folder, i).exists()]
        if missing:
            raise RuntimeError(f"{folder}: {len(missing)} of {n} PNGs missing after sampling (first: {missing[:5]})")
        write_adm_npz(npz, folder, n, size, np.arange(n) % num_classes)
        done.write_text(json.dumps({"num_samples": n, "npz": npz.name}))
        if not settings.save_png:
            for i in range(n):
                png_path(folder, i).unlink()
        log.info("%s: wrote %s", folder, npz)
    distributed.barrier()
    return npz


# ---- command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nit_lightning sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt of NiTModule or official NiT-XL .safetensors")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sizes", help="pixel sizes HxW, comma-separated, e.g. 256x256,320x960")
    which.add_argument("--sweep", help="YAML/JSON list of {size, method, steps, cfg, interval} (docs/sampling.md)")
    p.add_argument("--num-samples", type=int, default=50_000, help="images per size, exactly (default 50000)")
    p.add_argument("--method", choices=METHODS, default=None, help="euler (default) | heun | sde")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 50); NFE: euler/sde = steps, heun = 2·steps−1")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 1 = off)")
    p.add_argument("--interval", default=None, help="guidance interval lo,hi in t (default 0,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokens-per-pack", type=int, default=16384, help="model tokens per forward (CFG counts twice)")
    p.add_argument("--codec", default=None, help="dcae:PATH or pixel:F (default: the checkpoint's codec)")
    p.add_argument("--rope-layout", choices=("rowcol", "reference"), default=None)
    p.add_argument("--device", default="auto")
    png = p.add_mutually_exclusive_group()
    png.add_argument("--save-png", dest="save_png", action="store_true", default=True, help="keep the PNGs (default)")
    png.add_argument("--no-png", dest="save_png", action="store_false",
                     help="PNGs serve only as the resumable store and are removed once the npz is written")
    p.add_argument("--round", choices=ROUND_MODES, default=None, help="round invalid sizes instead of failing")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="sampler integration dtype")
    p.add_argument("--live-weights", action="store_true", help="use the live weights instead of the EMA ones")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> SampleSettings:
    solver = {"method": args.method, "steps": args.steps, "cfg_scale": args.cfg,
              "cfg_interval": parse_interval(args.interval) if args.interval else None}
    given = {k: v for k, v in solver.items() if v is not None}
    common = dict(ckpt=args.ckpt, out=args.out, num_samples=args.num_samples, seed=args.seed,
                  tokens_per_pack=args.tokens_per_pack, codec=args.codec, rope_layout=args.rope_layout,
                  device=args.device, save_png=args.save_png, use_ema=not args.live_weights, round=args.round,
                  precision=args.precision, dtype=args.dtype, progress=not args.no_progress)
    if args.sweep:
        return SampleSettings(**common, sweep=load_sweep(args.sweep, defaults=given))
    return SampleSettings(**common, sizes=parse_sizes(args.sizes), **given)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = run_sample(settings_from_args(args))
    if distributed.from_environment().is_main:
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0
