"""`python -m nit_lightning featurenet`: train the small demo feature network (an Inception stand-in, NOT Inception)."""
from __future__ import annotations

import argparse
import json
import logging

from nit_lightning.commands._common import run_command
from nit_lightning.evaluation.featurenet import train_featurenet

PROG = "python -m nit_lightning featurenet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="train a small CNN classifier on an ImageNet-style folder; its "
                                                 "features stand in for Inception in the CPU demo (NOT Inception)")
    parser.add_argument("--data", required=True, help="folder DIR/<class>/<image>")
    parser.add_argument("--out", required=True, help="output .pt (config + weights); use with featurenet:FILE")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="input side every image is resized to")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str]) -> int:
    return run_command(PROG, build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = train_featurenet(args.data, args.out, epochs=args.epochs, size=args.size, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed)
    print(json.dumps({"out": args.out, "note": "demo feature net, NOT Inception", **report}, indent=2))
    return 0
