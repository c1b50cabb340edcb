"""`python -m nit_lightning sweep`: sample + evaluate a resolution or aspect-ratio sweep (resumable per setting)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from nit_lightning import distributed
from nit_lightning.commands._common import run_command
from nit_lightning.evaluation.features import SPEC_HELP, load_feature_extractor
from nit_lightning.evaluation.sweep import default_sample_fn, run_sweep

PROG = "python -m nit_lightning sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="for each setting of a sweep YAML: sample (or reuse samples), "
                                                 "evaluate against REF_DIR/<HxW>.npz, write results.md/json")
    parser.add_argument("--sweep", required=True, help="experiments/sweeps/resolution.yaml or aspect_ratio.yaml")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint or official safetensors")
    parser.add_argument("--ref_dir", required=True, help="folder of reference batches named <HxW>.npz")
    parser.add_argument("--num", type=int, default=50000, help="samples per setting (class-balanced)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per setting)")
    parser.add_argument("--features", default="inception", help=SPEC_HELP)
    parser.add_argument("--device", default="auto",
                        help="auto = cuda:LOCAL_RANK when available, else cpu (sampling and features)")
    parser.add_argument("--settings", default=None, help="comma-separated subset, e.g. 256x256,512x512")
    parser.add_argument("--pr_dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--no_tensorboard", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    return run_command(PROG, build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = distributed.device_for(args.device, distributed.from_environment().local_rank)
    extractor = load_feature_extractor(args.features, device=device)
    only = [s.strip() for s in args.settings.split(",") if s.strip()] if args.settings else None
    summary = run_sweep(args.sweep, ref_dir=args.ref_dir, out=args.out, num=args.num, extractor=extractor,
                        sample_fn=default_sample_fn(args.ckpt, args.num, args.device), only=only,
                        tb=not args.no_tensorboard, pr_dtype=getattr(torch, args.pr_dtype),
                        identity={"ckpt": str(Path(args.ckpt).resolve())})
    if "features" in summary:  # rank 0 wrote the table
        print((Path(args.out) / "results.md").read_text())
    failed = [name for name, record in summary["results"].items() if record["status"] == "failed"]
    if failed:
        logging.getLogger(__name__).error("settings that failed: %s (see %s/results.json)", failed, args.out)
        return 1
    return 0
