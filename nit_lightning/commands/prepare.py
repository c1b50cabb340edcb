"""`python -m nit_lightning prepare`: encode an image folder into latent WebDataset shards + index.json."""
from __future__ import annotations

import argparse
import json
import logging
import time

from nit_lightning.data.codecs import CODEC_SPEC_HELP
from nit_lightning.data.imageops import MODES_HELP
from nit_lightning.data.prepare import PrepareSettings, reindex, run_prepare
from nit_lightning.data.shards import ShardFormatError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nit_lightning prepare",
        description="Images (class sub-folders, or a flat folder + --labels) -> latent shards. Resumable; "
        "parallel over shards with --num-workers and over ranks under torchrun/srun.",
    )
    parser.add_argument("--input", help="image folder: class sub-folders, or flat with --labels")
    parser.add_argument("--output", required=True, help="shard directory (shards, sidecars, index.json, classes.json)")
    parser.add_argument("--mode", default="native", help=MODES_HELP)
    parser.add_argument("--codec", default="pixel:8", help=CODEC_SPEC_HELP)
    parser.add_argument("--codec-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype of the DC-AE encoder")
    parser.add_argument("--labels", default=None, help="labels file for a flat folder: filename<TAB or comma>class")
    parser.add_argument("--flip", action="store_true", help="also store the latent of the horizontally mirrored image")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--num-workers", type=int, default=0, help="processes over shards (0 or 1: this process)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="storage dtype of latents")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (cuda:LOCAL_RANK under torchrun/srun) or cuda:N")
    parser.add_argument("--batch-size", type=int, default=16, help="images per codec call (equal sizes batch)")
    parser.add_argument("--prefix", default="shard", help="shard names are PREFIX-%%06d.tar")
    parser.add_argument("--max-area", type=int, default=None, help="native area cap in pixels (default (64·factor)²)")
    parser.add_argument("--reindex", action="store_true", help="only rebuild index.json from finished shards")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("prepare")
    if args.reindex:
        try:
            index = reindex(args.output)
        except (FileNotFoundError, ShardFormatError) as error:
            log.error("%s", error)
            return 2
        log.info("index.json: %d samples in %d shards, counts %s", index["num_samples"], index["num_shards"],
                 json.dumps(index["counts"]))
        return 0
    if not args.input:
        log.error("--input is required (unless --reindex)")
        return 2
    settings = PrepareSettings(
        input=args.input, output=args.output, mode=args.mode, codec=args.codec, codec_dtype=args.codec_dtype,
        labels=args.labels, flip=args.flip, samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
        dtype=args.dtype, device=args.device, prefix=args.prefix, batch_size=args.batch_size, max_area=args.max_area,
    )
    start = time.perf_counter()
    try:
        result = run_prepare(settings)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    log.info("rank %d/%d: encoded %d shards, %d already complete, %d failed in %.1f s", result["rank"],
             result["world"], result["encoded"], result["already_complete"], len(result["failed"]),
             time.perf_counter() - start)
    if result["index"] is not None:
        log.info("index.json: %d samples in %d shards, counts %s", result["index"]["num_samples"],
                 result["index"]["num_shards"], json.dumps(result["index"]["counts"]))
    return 1 if result["failed"] else 0
