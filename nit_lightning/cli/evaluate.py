"""`python -m nit_lightning evaluate`: FID / sFID / IS / precision / recall of a sample set against a reference batch."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from nit_lightning import distributed
from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.evaluation.evaluate import evaluate_samples
from nit_lightning.evaluation.extractors import SPEC_HELP, load_feature_extractor
from nit_lightning.records import write_json
from nit_lightning.records.files import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("evaluate", "ADM-suite metrics of samples (npz arr_0 or PNG folder) vs REF.npz",
                    renamed={"--dtype": "--feature-dtype"})
    p.add_argument("--samples", required=True, help="ADM npz (arr_0 NHWC uint8) or a folder of PNGs")
    p.add_argument("--ref", required=True, help="reference batch npz (ADM format)")
    p.add_argument("--features", default="inception", help=SPEC_HELP)
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print them only)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-network batch")
    p.add_argument("--feature-dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype of the feature network (default float32)")
    p.add_argument("--pr-dtype", choices=("float32", "float64"), default="float32",
                   help="precision/recall distance dtype")
    p.add_argument("--allow-size-mismatch", action="store_true",
                   help="evaluate samples whose size differs from the reference's")
    return p


def print_table(result: dict[str, Any], title: str = "evaluation") -> None:
    """A rich table of the metrics, with what made them."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in (("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("precision", "precision"),
                       ("recall", "recall"), ("num_samples", "N samples"), ("num_reference_images", "N ref (arr_0)")):
        if key in result:
            value = result[key]
            table.add_row(label, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("features", str(result.get("features")))
    console = Console()
    console.print(table)
    if "warning" in result:
        console.print(f"[bold red]WARNING: {result['warning']}[/]")


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out:
        check_output_file(args.out)  # before the work: a bad --out must not lose the result
    extractor = load_feature_extractor(args.features, device=distributed.device_for(args.device),
                                       batch_size=args.batch_size, dtype=getattr(torch, args.feature_dtype))
    result = evaluate_samples(args.samples, args.ref, extractor, batch_size=args.batch_size,
                              pr_dtype=getattr(torch, args.pr_dtype), allow_size_mismatch=args.allow_size_mismatch)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    print_table(result, title=f"{Path(args.samples).name} vs {Path(args.ref).name}")
    if args.out:
        write_json(args.out, result, indent=2)
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
