"""`python -m nit_lightning coco-prompts`: the COCO-2014 zero-shot prompts file (and the chosen real images) from
captions_val2014.json, for `sample --prompts` and `reference build` (evaluation/coco.py has the selection rule)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.evaluation.coco import choose_prompts, coco_record, link_real_images, load_coco_captions
from nit_lightning.records import write_json, write_text
from nit_lightning.records.files import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("coco-prompts", "choose N COCO-2014 validation images reproducibly, one caption each, as a "
                                    "prompts JSONL for `sample --prompts`")
    p.add_argument("--captions", required=True, help="COCO's annotations/captions_val2014.json")
    p.add_argument("--num-samples", type=int, default=30000, help="prompts (images) to choose")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of images and captions")
    p.add_argument("--size", default="1024", help="size every prompt asks for: HxW or one side (the paper: 1024)")
    p.add_argument("--sample-seed", type=int, default=0, help="the k-th prompt's sampling seed is this + k")
    p.add_argument("--out", required=True, help="the prompts JSONL; its provenance goes beside it as <out>.meta.json")
    p.add_argument("--list", default=None,
                   help="also write the chosen images' file names here, one a line (default: no list)")
    p.add_argument("--images", default=None, help="COCO's val2014 image folder (with --real-dir; default: none)")
    p.add_argument("--real-dir", default=None,
                   help="make a folder of links to the chosen real images here, for `reference build --images` "
                        "(default: no links)")
    return p


def _run(args: argparse.Namespace) -> int:
    if (args.images is None) != (args.real_dir is None):
        raise ValueError("--real-dir and --images go together: links in --real-dir to the chosen files of --images")
    size = parse_size(args.size)
    out = check_output_file(args.out)
    meta_path = out.with_name(out.name + ".meta.json")
    if args.list:
        check_output_file(args.list, "--list")
    images, without = load_coco_captions(args.captions)
    records = choose_prompts(images, args.num_samples, args.seed, size, sample_seed=args.sample_seed)
    if args.real_dir:  # before writing the prompts: a wrong image folder must not leave a half-made protocol
        linked = link_real_images(records, args.images, args.real_dir)
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    meta = coco_record(args.captions, num=args.num_samples, seed=args.seed, size=size, sample_seed=args.sample_seed,
                       available=len(images), without_captions=without)
    if args.real_dir:
        meta.update({"images": str(Path(args.images).resolve()), "real_dir": str(Path(args.real_dir).resolve())})
    write_json(meta_path, meta, indent=2)
    if args.list:
        write_text(args.list, "".join(r["coco_file"] + "\n" for r in records))
    print(f"wrote {out}: {len(records)} prompts at {format_size(size)} from {len(images)} captioned images "
          f"({without} without a caption left out), seed {args.seed}; provenance {meta_path}"
          + (f"; {linked} real images linked in {args.real_dir}" if args.real_dir else ""))
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
