"""`python -m nit_lightning evaluate`: FID / sFID / IS / precision / recall of a sample set against a reference batch,
and with --clip-model the CLIP score of a text-to-image sample folder against its prompts.jsonl."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import dtype_name, run_command
from nit_lightning.evaluation.evaluate import evaluate_samples
from nit_lightning.evaluation.sample_prompts import PROMPTS_FILE
from nit_lightning.evaluation.extractors import SPEC_HELP, load_feature_extractor
from nit_lightning.records import write_json
from nit_lightning.records.files import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("evaluate", "ADM-suite metrics of samples (npz arr_0 or PNG folder) vs REF.npz",
                    renamed={"--dtype": "--feature-dtype"})
    p.add_argument("--samples", required=True, help="ADM npz (arr_0 NHWC uint8) or a folder of PNGs")
    p.add_argument("--ref", default=None,
                   help="reference batch npz (ADM format); required, except with --clip-model for the CLIP score alone")
    p.add_argument("--features", default="inception", help=SPEC_HELP)
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print them only)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-network batch")
    p.add_argument("--feature-dtype", choices=("float32", "float64"),
                   type=dtype_name(("float32", "float64")), default="float32",
                   help="compute dtype of the feature network (default float32)")
    p.add_argument("--pr-dtype", choices=("float32", "float64"),
                   type=dtype_name(("float32", "float64")), default="float32",
                   help="precision/recall distance dtype")
    p.add_argument("--allow-size-mismatch", action="store_true",
                   help="evaluate samples whose size differs from the reference's")
    p.add_argument("--clip-model", default=None,
                   help=f"a local transformers CLIP folder (e.g. openai/clip-vit-large-patch14 copied there): add "
                        f"the CLIP score of a sample folder against its {PROMPTS_FILE} (default: no CLIP score)")
    return p


def print_table(result: dict[str, Any], title: str = "evaluation") -> None:
    """A rich table of the metrics, with what made them."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in (("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("precision", "precision"),
                       ("recall", "recall"), ("num_samples", "N samples"), ("num_reference_images", "N ref (arr_0)"),
                       ("clip_score", "CLIP score"), ("clip_score_stderr", "  ± stderr"),
                       ("clip_score_x100", "CLIP score ×100"), ("clip_score_n", "N CLIP"),
                       ("clip_prompts_truncated", "prompts cut to CLIP's limit")):
        if key in result:
            value = result[key]
            table.add_row(label, f"{value:.4f}" if isinstance(value, float) else str(value))
    if "features" in result:
        table.add_row("features", str(result["features"]))
    if "clip_model" in result:
        table.add_row("CLIP model", str(result["clip_model"]["path"]))
    console = Console()
    console.print(table)
    if "warning" in result:
        console.print(f"[bold red]WARNING: {result['warning']}[/]")


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.ref is None and args.clip_model is None:
        raise ValueError("--ref REF.npz is required (or --clip-model DIR for the CLIP score alone)")
    if args.out:
        check_output_file(args.out)  # before the work: a bad --out must not lose the result
    device = distributed.device_for(args.device)
    scorer = None
    if args.clip_model is not None:  # before FID's minutes: a bad CLIP folder or prompts file fails first
        from nit_lightning.evaluation.clip_score import ClipScorer
        from nit_lightning.evaluation.sample_prompts import read_sample_prompts

        if not Path(args.samples).is_dir():
            raise ValueError(f"--clip-model needs --samples to be a folder of images with its {PROMPTS_FILE}, not "
                             f"{args.samples!r}")
        read_sample_prompts(args.samples)
        scorer = ClipScorer(args.clip_model, device=device, batch_size=args.batch_size)
    result: dict[str, Any] = {"samples": str(args.samples)}
    if args.ref is not None:
        extractor = load_feature_extractor(args.features, device=device, batch_size=args.batch_size,
                                           dtype=getattr(torch, args.feature_dtype))
        result = evaluate_samples(args.samples, args.ref, extractor, batch_size=args.batch_size,
                                  pr_dtype=getattr(torch, args.pr_dtype), allow_size_mismatch=args.allow_size_mismatch)
    if scorer is not None:
        from nit_lightning.evaluation.clip_score import score_sample_folder

        result.update(score_sample_folder(args.samples, scorer, batch_size=args.batch_size))
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    title = f"{Path(args.samples).name} vs {Path(args.ref).name}" if args.ref else f"{Path(args.samples).name} (CLIP)"
    print_table(result, title=title)
    if args.out:
        write_json(args.out, result, indent=2)
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
