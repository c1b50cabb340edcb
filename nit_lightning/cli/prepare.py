"""`python -m nit_lightning prepare`: encode an image folder into latent WebDataset shards + index.json."""
from __future__ import annotations

import argparse
import json
import logging
import time

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import dtype_name, run_command
from nit_lightning.data.captions import CAPTIONS_HELP, MISSING_CAPTION
from nit_lightning.data.codecs import CODEC_SPEC_HELP
from nit_lightning.data.imageops import MODES_HELP
from nit_lightning.data.prepare import PrepareSettings, reindex, run_prepare
from nit_lightning.data.shards import ShardFormatError
from nit_lightning.data.text_encoders import TEXT_ENCODER_SPEC_HELP

log = logging.getLogger("prepare")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("prepare", "Images (class sub-folders, a flat folder + --labels, or captioned images + --captions) "
                               "-> latent shards. Resumable; "
                               "decoding in --num-workers processes, one codec per rank (torchrun/srun: one per GPU).",
                    renamed={"--dtype": "--latent-dtype"})
    p.add_argument("--input", help="image folder: class sub-folders, flat with --labels, or any layout with --captions "
                   "(required unless --reindex)")
    p.add_argument("--output", required=True, help="shard directory (shards, sidecars, index.json, classes.json)")
    p.add_argument("--mode", default="native", help=MODES_HELP)
    p.add_argument("--codec", default="pixel:8", help=CODEC_SPEC_HELP + " (default: pixel:8, 192 channels, for debug "
                   "data; ImageNet takes --codec dcae:PATH, README 'Real weights and data')")
    p.add_argument("--codec-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   type=dtype_name(("float32", "bfloat16", "float16")),
                   help="compute dtype of the DC-AE encoder")
    p.add_argument("--labels", default=None, help="labels file for a flat folder: filename<TAB or comma>class "
                   "(default: none, the class sub-folders are the labels)")
    p.add_argument("--captions", default=None, help=CAPTIONS_HELP)
    p.add_argument("--missing-caption", default="skip", choices=MISSING_CAPTION,
                   help="an image without a caption (or an empty one): skip it, counted as 'no-caption' (default), "
                        "or keep it with the empty caption")
    p.add_argument("--text-encoder", default=None, help="with --captions: count each caption's tokens with this "
                   "encoder's tokenizer (the network is not run) into index.json, for data.caption_token_cost: "
                   + TEXT_ENCODER_SPEC_HELP + ", as model.text_encoder (default: no counts)")
    p.add_argument("--flip", action="store_true", help="also store the latent of the horizontally mirrored image")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard tar")
    p.add_argument("--num-workers", type=int, default=0,
                   help="decode + resize processes feeding this process's codec (0: decode in this process)")
    p.add_argument("--latent-dtype", default="float16", choices=("float16", "bfloat16"),
                   type=dtype_name(("float16", "bfloat16")),
                   help="storage dtype of the latents in the shards (default float16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (cuda:LOCAL_RANK under torchrun/srun) or cuda:N")
    p.add_argument("--batch-size", type=int, default=16,
                   help="codec inputs per call: images of equal size anywhere in a shard (an image + its mirror = 2)")
    p.add_argument("--prefix", default="shard", help="shard names are PREFIX-%%06d.tar")
    p.add_argument("--max-area", type=int, default=None, help="native area cap in pixels (default (64·factor)²)")
    p.add_argument("--reindex", action="store_true", help="only rebuild index.json from finished shards")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.reindex:
        try:
            index = reindex(args.output)
        except ShardFormatError as error:
            raise ValueError(str(error)) from error
        log.info("index.json: %d samples in %d shards, counts %s", index["num_samples"], index["num_shards"],
                 json.dumps(index["counts"]))
        return 0
    if not args.input:
        raise ValueError("--input is required (unless --reindex)")
    settings = PrepareSettings(
        input=args.input, output=args.output, mode=args.mode, codec=args.codec, codec_dtype=args.codec_dtype,
        labels=args.labels, flip=args.flip, samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
        latent_dtype=args.latent_dtype, device=args.device, prefix=args.prefix, batch_size=args.batch_size, max_area=args.max_area,
        captions=args.captions, missing_caption=args.missing_caption, text_encoder=args.text_encoder,
    )
    start = time.perf_counter()
    result = run_prepare(settings)
    log.info("rank %d/%d: encoded %d shards, %d already complete, %d failed in %.1f s", result["rank"],
             result["world"], result["encoded"], result["already_complete"], len(result["failed"]),
             time.perf_counter() - start)
    if result["index"] is not None:
        log.info("index.json: %d samples in %d shards, counts %s", result["index"]["num_samples"],
                 result["index"]["num_shards"], json.dumps(result["index"]["counts"]))
    if result["failed"]:
        log.error("%d shards failed (rerun to retry them): %s", len(result["failed"]), result["failed"])
        return 1
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
