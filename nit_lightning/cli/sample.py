"""`python -m nit_lightning sample`: class-balanced samples per size -> PNGs + one ADM npz per size (generation/).

Image i has label i mod num_classes and seed derive_seed(seed, i): the set is the same on any number of GPUs
(`torchrun --nproc-per-node 8 -m nit_lightning sample ...` gives each rank a strided slice). Resumable: existing
PNGs are kept; a folder made by other weights or settings is refused (provenance.json).
"""
from __future__ import annotations

import argparse

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.sizes import ROUND_MODES, parse_sizes
from nit_lightning.diffusion.sampling import METHODS
from nit_lightning.generation.sample_set import SampleRun, run_sample
from nit_lightning.generation.settings import (
    INTEGRATION_DTYPES,
    PRECISIONS,
    SamplerSettings,
    SizeSetting,
    load_sweep,
    parse_interval,
)

SAMPLER_FLAGS = ("method", "steps", "cfg", "interval", "precision", "integration_dtype", "rope_interp_side")
RENAMED = {"--dtype": "--integration-dtype", "--tokens-per-pack": "--tokens-per-forward"}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sample", __doc__, renamed=RENAMED)
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt of NiTModule or official NiT .safetensors")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sizes", help="pixel sizes HxW, comma-separated, e.g. 256x256,320x960")
    which.add_argument("--sweep", help="sweep file of per-size sampler settings (experiments/sweeps/*.yaml)")
    p.add_argument("--num-samples", type=int, default=50_000, help="images per size, exactly (default 50000)")
    p.add_argument("--method", choices=METHODS, default=None, help="euler (default) | heun | sde")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 50); NFE: euler/sde = steps, "
                                                           "heun = 2·steps−1")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 1 = off)")
    p.add_argument("--interval", default=None, help="guidance interval lo,hi in t (default 0,1)")
    p.add_argument("--precision", default=None, metavar="{auto," + ",".join(PRECISIONS) + "}",
                   help="model compute: auto (default: bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16, "
                        "float16")
    p.add_argument("--integration-dtype", choices=INTEGRATION_DTYPES, default=None,
                   help="dtype of the sampler's state (default float64)")
    p.add_argument("--rope-interp-side", type=int, default=None,
                   help="interpolate RoPE positions of images whose longer side exceeds this many tokens (SPEC §1.1; "
                        "off by default, as in every published number)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (one sub-folder per size)")
    p.add_argument("--tokens-per-forward", type=int, default=16384,
                   help="model tokens per forward pass (CFG's null branch counts twice; default 16384)")
    p.add_argument("--codec", default=None, help="dcae:PATH, tinyae:PATH or pixel:F (default: the checkpoint's)")
    p.add_argument("--rope-layout", choices=("rowcol", "reference"), default=None)
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, "
                                                    "cuda:N")
    png = p.add_mutually_exclusive_group()
    png.add_argument("--save-png", dest="save_png", action="store_true", default=True, help="keep the PNGs (default)")
    png.add_argument("--no-png", dest="save_png", action="store_false",
                     help="PNGs serve only as the resumable store and are removed once the npz is written")
    p.add_argument("--round", choices=ROUND_MODES, default=None, help="round invalid sizes instead of failing")
    p.add_argument("--live-weights", action="store_true", help="use the live weights instead of the EMA ones")
    p.add_argument("--no-progress", action="store_true")
    return p


def settings_from_args(args: argparse.Namespace) -> list[SizeSetting]:
    """--sweep FILE (the file sets the sampler per size) or --sizes with the sampler flags."""
    given = {name: getattr(args, name) for name in SAMPLER_FLAGS if getattr(args, name) is not None}
    if args.sweep:
        if given:
            raise ValueError(f"--sweep sets the sampler per size; drop {['--' + k for k in given]} or use --sizes")
        return list(load_sweep(args.sweep).settings)
    if "interval" in given:
        given["interval"] = parse_interval(given["interval"])
    sampler = SamplerSettings.from_dict(given, where="sample flags")
    return [SizeSetting(size, sampler) for size in parse_sizes(args.sizes)]


def _run(args: argparse.Namespace) -> int:
    run = SampleRun(ckpt=args.ckpt, out=args.out, settings=settings_from_args(args), num_samples=args.num_samples,
                    seed=args.seed, tokens_per_forward=args.tokens_per_forward, codec=args.codec, rope_layout=args.rope_layout,
                    device=args.device, save_png=args.save_png, use_ema=not args.live_weights, round=args.round,
                    progress=not args.no_progress)
    ranks = distributed.from_environment()
    with distributed.process_group(ranks, distributed.device_for(args.device, ranks.local_rank)):
        paths = run_sample(run)
    if ranks.is_main:
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
