"""`python -m nit_lightning synth`: write the procedural native-resolution image folder (data/synthetic.py), or with
`--captioned` the captioned set of NiT-T2I (data/synthetic_captions.py: colour and shape independent, held-out pairs)."""
from __future__ import annotations

import argparse
import logging
import time

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.synthetic import SynthSettings, write_synthetic
from nit_lightning.data.synthetic_captions import PALETTE, CaptionedSynthSettings, write_captioned_synthetic


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("synth", "Write a class-conditional ImageNet-style folder of PNGs at many sizes and aspect ratios.")
    p.add_argument("--out", required=True, help="output directory (class sub-folders; train/ and val/ with a split)")
    p.add_argument("--num-images", type=int, default=1000, help="images in all (train and val together)")
    p.add_argument("--num-classes", type=int, default=10, help="shape classes (up to 10 shapes, then colours vary)")
    p.add_argument("--min-side", type=int, default=32, help="shortest image side in pixels")
    p.add_argument("--max-side", type=int, default=256, help="longest image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole set (same seed and options: same bytes)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of images written to DIR/val")
    p.add_argument("--max-aspect", type=float, default=3.0, help="aspect ratios from 1:A to A:1")
    p.add_argument("--min-long-side", type=int, default=0,
                   help="long side drawn from [max(this, min-side), max-side] (0: from min-side)")
    p.add_argument("--snap-fraction", type=float, default=0.5, help="share of images with sides multiple of 8")
    t2i = p.add_argument_group("captioned set (NiT-T2I): NNNNNNN.png + NNNNNNN.txt, captions.jsonl")
    t2i.add_argument("--captioned", action="store_true", help="write captioned images of one coloured object each "
                     "(--num-classes is then unused: the ten shapes are crossed with the colours)")
    t2i.add_argument("--colours", default=",".join(PALETTE), help=f"comma-separated palette names, >= 6 of {list(PALETTE)}")
    t2i.add_argument("--held-out-per-shape", type=int, default=1, help="colours per shape never drawn in train/ or val/")
    t2i.add_argument("--held-out-seed", type=int, default=0, help="seed of which colour x shape pairs are held out")
    t2i.add_argument("--held-out-images", type=int, default=0, help="images of held-out pairs written to heldout/")
    t2i.add_argument("--small-fraction", type=float, default=0.0, help="share of objects drawn small ('a small ...')")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.captioned:
        return _run_captioned(args)
    settings = SynthSettings(
        out=args.out, num_images=args.num_images, num_classes=args.num_classes, min_side=args.min_side,
        max_side=args.max_side, seed=args.seed, val_fraction=args.val_fraction, max_aspect=args.max_aspect,
        snap_fraction=args.snap_fraction, min_long_side=args.min_long_side,
    )
    start = time.perf_counter()
    manifest = write_synthetic(settings)
    logging.info("wrote %s images (%s) to %s in %.1f s", settings.num_images, manifest["counts"], args.out,
                 time.perf_counter() - start)
    return 0


def _run_captioned(args: argparse.Namespace) -> int:
    settings = CaptionedSynthSettings(
        out=args.out, num_images=args.num_images, min_side=args.min_side, max_side=args.max_side, seed=args.seed,
        val_fraction=args.val_fraction, max_aspect=args.max_aspect, snap_fraction=args.snap_fraction,
        min_long_side=args.min_long_side, colours=tuple(c.strip() for c in args.colours.split(",") if c.strip()),
        held_out_per_shape=args.held_out_per_shape, held_out_seed=args.held_out_seed,
        held_out_images=args.held_out_images, small_fraction=args.small_fraction,
    )
    start = time.perf_counter()
    manifest = write_captioned_synthetic(settings)
    counts = manifest.get("counts")
    logging.info("wrote %s captioned images (%s) to %s in %.1f s", settings.num_images, counts, args.out,
                 time.perf_counter() - start)
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
