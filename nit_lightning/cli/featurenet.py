"""`python -m nit_lightning featurenet`: train the small demo feature network (an Inception stand-in, NOT Inception)."""
from __future__ import annotations

import argparse
import json

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.evaluation.classifiers import train_featurenet


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("featurenet", "train a small CNN classifier on an ImageNet-style folder; its features stand in "
                                  "for Inception in the CPU demo (NOT Inception)")
    p.add_argument("--data", required=True, help="folder DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="output .pt (config + weights); use with featurenet:FILE")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    p.add_argument("--size", type=int, default=64, help="input side every image is resized to")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the batch order")
    p.add_argument("--input", default="rgb", choices=("rgb", "gray-std"),
                   help="rgb: the demo feature net; gray-std: the shape classifier (grayscale, standardised)")
    return p


def _run(args: argparse.Namespace) -> int:
    report = train_featurenet(args.data, args.out, epochs=args.epochs, size=args.size, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed, input=args.input)
    print(json.dumps({"out": args.out, "note": "demo feature net, NOT Inception", **report}, indent=2))
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
