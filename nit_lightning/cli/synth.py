"""`python -m nit_lightning synth`: write the procedural native-resolution image folder (data/synthetic.py)."""
from __future__ import annotations

import argparse
import logging
import time

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.synthetic import SynthSettings, write_synthetic


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
    return p


def _run(args: argparse.Namespace) -> int:
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


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
