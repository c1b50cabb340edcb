"""`python -m nit_lightning reference build|show`: ADM-format reference statistics for any resolution / aspect ratio."""
from __future__ import annotations

import argparse
import json

import numpy as np

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command, subparser
from nit_lightning.data.sizes import parse_size
from nit_lightning.evaluation.extractors import SPEC_HELP, load_feature_extractor
from nit_lightning.evaluation.reference import (
    PROTOCOL,
    build_reference,
    check_reference_output,
    load_reference,
    reference_record,
    save_reference,
)
from nit_lightning.records.files import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("reference", "build or inspect ADM-format reference batches (npz)")
    sub = p.add_subparsers(dest="action", required=True)
    build = subparser(sub, "build", f"statistics of an image folder at HxW ({PROTOCOL})")
    build.add_argument("--images", required=True, help="image folder (recursive; sorted by relative path)")
    build.add_argument("--size", required=True, help="target HxW, e.g. 256x256 or 480x640")
    build.add_argument("--out", required=True, help="output npz, e.g. references/256x256.npz")
    build.add_argument("--features", default="inception", help=SPEC_HELP)
    build.add_argument("--subset", type=int, default=10000, help="images kept as arr_0 (for precision/recall)")
    build.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset")
    build.add_argument("--batch-size", type=int, default=64, help="images per feature-network batch")
    build.add_argument("--workers", type=int, default=2, help="image decoding threads")
    build.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:N")
    show = subparser(sub, "show", "print what a reference npz holds")
    show.add_argument("path", help="the reference npz")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.action == "build":
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_output_file(args.out)  # before loading the extractor: a wrong --out costs nothing
        extractor = load_feature_extractor(args.features, device=distributed.device_for(args.device),
                                           batch_size=args.batch_size)
        size = parse_size(args.size)
        check_reference_output(args.out, reference_record(extractor.name, size, subset=args.subset, seed=args.seed,
                                                          source=args.images))
        ref = build_reference(args.images, size, extractor, subset=args.subset, seed=args.seed,
                              batch_size=args.batch_size, num_workers=args.workers)
        save_reference(args.out, ref)
        print(f"wrote {args.out}: {ref.meta['num_images']} images, arr_0 {tuple(ref.images.shape)}, "
              f"features {ref.meta['extractor']}")
        return 0
    ref = load_reference(args.path)
    summary = {"meta": ref.meta, "mu": list(np.shape(ref.mu)), "sigma": list(np.shape(ref.sigma)),
               "mu_s": list(np.shape(ref.mu_s)), "sigma_s": list(np.shape(ref.sigma_s)),
               "arr_0": None if ref.images is None else list(ref.images.shape),
               "arr_0_pool": None if ref.pool is None else list(ref.pool.shape)}
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
