"""`python -m nit_lightning synth`: write the procedural native-resolution image folder (see data/synthetic.py)."""
from __future__ import annotations

import argparse
import logging
import time

from nit_lightning.data.synthetic import SynthSettings, write_synthetic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nit_lightning synth",
        description="Write a class-conditional ImageNet-style folder of PNGs at many sizes and aspect ratios.",
    )
    parser.add_argument("--out", required=True, help="output directory (class sub-folders; train/ and val/ with a split)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--min-side", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images written to DIR/val")
    parser.add_argument("--max-aspect", type=float, default=3.0, help="aspect ratios from 1:A to A:1")
    parser.add_argument("--snap-fraction", type=float, default=0.5, help="share of images with sides multiple of 8")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = SynthSettings(
        out=args.out, num_images=args.num_images, num_classes=args.num_classes, min_side=args.min_side,
        max_side=args.max_side, seed=args.seed, val_fraction=args.val_fraction, max_aspect=args.max_aspect,
        snap_fraction=args.snap_fraction,
    )
    start = time.perf_counter()
    try:
        manifest = write_synthetic(settings)
    except ValueError as error:
        logging.error("%s", error)
        return 2
    logging.info("wrote %s images (%s) to %s in %.1f s", settings.num_images, manifest["counts"], args.out,
                 time.perf_counter() - start)
    return 0
