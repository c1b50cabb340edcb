"""`python -m nit_lightning sample`: class-balanced samples per size -> PNGs + one ADM npz per size + OUT/grid.png.

The sampler comes from the flags, else from the checkpoint's recipe (the recommended sampler of its training config,
e.g. the demo's Heun 8, CFG 3 on [0, 0.9]), else from the defaults; the log says which value came from where. RoPE
positions are interpolated beyond the token range the checkpoint was trained on (--no-rope-interp turns that off).
Without --num-samples it makes one image per class (at most 16): a grid to look at. The paper's protocol is
--num-samples 50000 with the paper's sampler flags, or --sweep experiments/sweeps/resolution.yaml (per-size settings,
taken from the file as they are).

NiT-T2I checkpoints sample prompts: --prompts FILE (one prompt per line, or JSONL with prompt and optional height,
width, seed; generation/prompts.py) at each prompt's size, else at every --sizes size; OUT holds the PNGs and
prompts.jsonl, one line per image {file, prompt, height, width, seed} (generation/prompt_set.py).

Image i has label i mod num_classes and seed derive_seed(seed, i): the set is the same on any number of GPUs
(`torchrun --nproc-per-node 8 -m nit_lightning sample ...` gives each rank a strided slice). Resumable: existing
PNGs are kept; a folder made by other weights or settings is refused (provenance.json).
"""
from __future__ import annotations

import argparse
from typing import Any

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import add_threads, apply_threads, dtype_name, run_command
from nit_lightning.data.sizes import ROUND_MODES, parse_sizes
from nit_lightning.diffusion.sampling import METHODS
from nit_lightning.generation.sample_set import SampleRun, run_sample
from nit_lightning.generation.settings import (
    INTEGRATION_DTYPES,
    PRECISIONS,
    SamplerSettings,
    load_sweep,
    parse_interval,
)

SAMPLER_FLAGS = ("method", "steps", "cfg", "interval", "precision", "integration_dtype", "rope_interp_side")
RENAMED = {"--dtype": "--integration-dtype", "--tokens-per-pack": "--tokens-per-forward"}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sample", __doc__, renamed=RENAMED)
    p.add_argument("--ckpt", required=True, help="Lightning .ckpt of NiTModule or official NiT .safetensors")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sizes", help="pixel sizes HxW, comma-separated, e.g. 256x256,320x960 (this or --sweep is "
                                          "required; with --prompts: the sizes of prompts that give none)")
    which.add_argument("--sweep", help="sweep file of per-size sampler settings (experiments/sweeps/*.yaml), taken as "
                                          "written (this or --sizes is required)")
    p.add_argument("--prompts", help="NiT-T2I: a prompts file, one prompt per line or JSONL with prompt and optional "
                                     "height, width (pixels) and seed; OUT gets the PNGs and prompts.jsonl (default: none, class labels)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images per size, exactly (default: one per class, at most 16: a grid to look at; the paper's "
                        "protocol: --num-samples 50000, or --sweep experiments/sweeps/resolution.yaml); with "
                        "--prompts: images per prompt and size (default 1)")
    recipe = "the checkpoint's recipe, else"
    p.add_argument("--method", choices=METHODS, default=None, help=f"euler | heun | sde (default: {recipe} euler)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"solver steps (default: {recipe} 50); NFE: euler/sde = steps, heun = 2·steps−1")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale (default: {recipe} 1 = off)")
    p.add_argument("--interval", default=None, help=f"guidance interval lo,hi in t (default: {recipe} 0,1)")
    p.add_argument("--precision", default=None, metavar="{auto," + ",".join(PRECISIONS) + "}",
                   help=f"model compute (default: {recipe} auto = bfloat16 autocast on CUDA, float32 on CPU)")
    p.add_argument("--integration-dtype", choices=INTEGRATION_DTYPES, default=None,
                   type=dtype_name(INTEGRATION_DTYPES),
                   help=f"dtype of the sampler's state (default: {recipe} float64)")
    rope = p.add_mutually_exclusive_group()
    rope.add_argument("--rope-interp-side", type=int, default=None,
                      help="interpolate RoPE positions of images whose longer side exceeds this many tokens (SPEC §1.1)"
                           " (default: the checkpoint's recipe, else the side of its largest training image, else off)")
    rope.add_argument("--no-rope-interp", action="store_true",
                      help="no RoPE interpolation beyond the trained range, as in every published number "
                           "(default: off, i.e. interpolation on where the checkpoint records its range)")
    p.add_argument("--seed", type=int, default=0, help="base seed: image i uses derive_seed(seed, i) (default 0)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per size)")
    p.add_argument("--tokens-per-forward", type=int, default=16384,
                   help="model tokens per forward pass (CFG's null branch counts twice; default 16384)")
    p.add_argument("--codec", default=None, help="dcae:PATH, tinyae:PATH or pixel:F (default: the checkpoint's)")
    p.add_argument("--rope-layout", choices=("rowcol", "reference"), default=None,
                   help="RoPE coordinate layout (default: the checkpoint's; official weights: reference)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, "
                                                    "cuda:N")
    png = p.add_mutually_exclusive_group()
    png.add_argument("--save-png", dest="save_png", action="store_true", default=True, help="keep the PNGs (default)")
    png.add_argument("--no-png", dest="save_png", action="store_false",
                     help="PNGs serve only as the resumable store and are removed once the npz is written")
    p.add_argument("--round", choices=ROUND_MODES, default=None,
                   help="round sizes that are not a multiple of codec factor x patch (default: refuse them)")
    p.add_argument("--live-weights", action="store_true", help="use the live weights instead of the EMA ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_threads(p)
    return p


def sampler_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler keys given on the command line (checked now: a bad value fails before the checkpoint loads)."""
    given = {name: getattr(args, name) for name in SAMPLER_FLAGS if getattr(args, name) is not None}
    if args.sweep and (given or args.no_rope_interp):
        flags = ["--" + k.replace("_", "-") for k in given] + (["--no-rope-interp"] if args.no_rope_interp else [])
        raise ValueError(f"--sweep sets the sampler per size; drop {flags} or use --sizes")
    if "interval" in given:
        given["interval"] = parse_interval(given["interval"])
    SamplerSettings.from_dict(given, where="sample flags")
    return given


def _run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    flags = sampler_flags(args)
    if args.prompts is not None:
        return _run_prompts(args, flags)
    if not args.sizes and not args.sweep:
        raise ValueError("give --sizes or --sweep (or --prompts FILE for a text-to-image checkpoint)")
    run = SampleRun(ckpt=args.ckpt, out=args.out, settings=list(load_sweep(args.sweep).settings) if args.sweep else [],
                    sizes=parse_sizes(args.sizes) if args.sizes else [], sampler_flags=flags,
                    rope_interp=not args.no_rope_interp, num_samples=args.num_samples,
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


def _run_prompts(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    """`sample --prompts`: read and check the prompts (before the checkpoint loads), then sample them."""
    from nit_lightning.generation.prompt_set import PromptRun, run_prompts
    from nit_lightning.generation.prompts import read_prompts

    if args.sweep:
        raise ValueError("--prompts and --sweep cannot be combined: give the sizes with --sizes or in the prompts file")
    run = PromptRun(ckpt=args.ckpt, out=args.out, specs=read_prompts(args.prompts), prompts_file=args.prompts,
                    sizes=parse_sizes(args.sizes) if args.sizes else [], sampler_flags=flags,
                    rope_interp=not args.no_rope_interp, per_prompt=args.num_samples or 1, seed=args.seed,
                    tokens_per_forward=args.tokens_per_forward, codec=args.codec, device=args.device,
                    use_ema=not args.live_weights, round=args.round)
    ranks = distributed.from_environment()
    with distributed.process_group(ranks, distributed.device_for(args.device, ranks.local_rank)):
        path = run_prompts(run)
    if ranks.is_main:
        print(f"prompts: {path}")
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
