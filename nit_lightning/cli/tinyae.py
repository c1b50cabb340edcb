"""`python -m nit_lightning tinyae`: train the tiny autoencoder behind the `tinyae:PATH` codec on an image folder."""
from __future__ import annotations

import argparse
import json

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.tinyae import TinyAEConfig, TinyAETrainSettings, train_tinyae


def build_parser() -> argparse.ArgumentParser:
    config, train = TinyAEConfig(), TinyAETrainSettings()
    parser = make_parser("tinyae", "train a tiny convolutional autoencoder on the images of a folder; use the file as "
                                   "--codec tinyae:FILE")
    parser.add_argument("--data", required=True, help="folder with images (searched recursively)")
    parser.add_argument("--out", required=True, help="output .pt (config, weights, latent scaling factor)")
    parser.add_argument("--latent-channels", type=int, default=config.latent_channels, help="channels of a latent")
    parser.add_argument("--factor", type=int, default=config.factor, help="pixels per latent pixel and side")
    parser.add_argument("--width", type=int, default=config.width, help="channels of the conv layers")
    parser.add_argument("--blocks", type=int, default=config.blocks, help="residual blocks per stage")
    parser.add_argument("--steps", type=int, default=train.steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=train.batch_size, help="crops per step")
    parser.add_argument("--crop", type=int, default=train.crop, help="side of the random training crops (px)")
    parser.add_argument("--lr", type=float, default=train.lr, help="AdamW learning rate")
    parser.add_argument("--latent-noise", type=float, default=train.latent_noise,
                        help="std of noise added to latents while training (a smoother decoder)")
    parser.add_argument("--seed", type=int, default=train.seed, help="seed of the init and the crops")
    return parser


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    config = TinyAEConfig(latent_channels=args.latent_channels, factor=args.factor, width=args.width, blocks=args.blocks)
    settings = TinyAETrainSettings(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                                   latent_noise=args.latent_noise, seed=args.seed)
    report = train_tinyae(args.data, args.out, config, settings)
    print(json.dumps({"out": args.out, "codec": f"tinyae:{args.out}", **report}, indent=2))
    return 0
