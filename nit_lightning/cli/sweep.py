"""`python -m nit_lightning sweep`: sample + evaluate a resolution or aspect-ratio sweep (resumable per setting)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import add_threads, apply_threads, dtype_name, run_command
from nit_lightning.evaluation.extractors import SPEC_HELP, load_feature_extractor
from nit_lightning.evaluation.sweep import run_sweep
from nit_lightning.generation.pipeline import load_pipeline
from nit_lightning.generation.settings import load_sweep


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sweep", "for each setting of a sweep file: sample (or reuse samples), evaluate against "
                             "REF_DIR/<HxW>.npz, write results.md/json and TensorBoard scalars",
                    renamed={"--tokens-per-pack": "--tokens-per-forward"})
    p.add_argument("--sweep", required=True, help="experiments/sweeps/resolution.yaml or aspect_ratio.yaml")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint or official safetensors")
    p.add_argument("--ref-dir", required=True, help="folder of reference batches named <HxW>.npz")
    p.add_argument("--num-samples", type=int, default=50000, help="samples per setting (class-balanced)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per setting)")
    p.add_argument("--features", default="inception", help=SPEC_HELP)
    p.add_argument("--device", default="auto",
                   help="auto = cuda:LOCAL_RANK when available, else cpu (sampling and features)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated subset of the sweep, e.g. 256x256,512x512 (default: every setting)")
    p.add_argument("--seed", type=int, default=0, help="base seed: image i uses derive_seed(seed, i)")
    p.add_argument("--tokens-per-forward", type=int, default=16384, help="model tokens per forward (CFG counts twice)")
    p.add_argument("--codec", default=None, help="dcae:PATH / tinyae:PATH / pixel:F (default: the checkpoint's)")
    p.add_argument("--pr-dtype", choices=("float32", "float64"),
                   type=dtype_name(("float32", "float64")), default="float32",
                   help="dtype of the precision/recall distances")
    p.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard scalars")
    add_threads(p)
    return p


def _run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    ranks = distributed.from_environment()
    device = distributed.device_for(args.device, ranks.local_rank)
    sweep = load_sweep(args.sweep).select([s for s in args.sizes.split(",") if s.strip()] if args.sizes else None)
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (a covariance needs two samples), got {args.num_samples}")
    with distributed.process_group(ranks, device):
        extractor = load_feature_extractor(args.features, device=device)
        pipeline = load_pipeline(args.ckpt, device=device, codec=args.codec)
        summary = run_sweep(sweep, ref_dir=args.ref_dir, out=args.out, num=args.num_samples, extractor=extractor,
                            pipeline=pipeline, seed=args.seed, tokens_per_forward=args.tokens_per_forward,
                            tb=not args.no_tensorboard, pr_dtype=getattr(torch, args.pr_dtype))
    if "features" in summary:  # rank 0 wrote the table
        print((Path(args.out) / "results.md").read_text())
    failed = [name for name, record in summary["results"].items() if record["status"] == "failed"]
    if failed:
        logging.getLogger(__name__).error("settings that failed: %s (see %s/results.json)", failed, args.out)
        return 1
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
