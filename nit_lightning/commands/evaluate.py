"""`python -m nit_lightning evaluate`: FID / sFID / IS / precision / recall of a sample set against a reference batch."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from nit_lightning.commands._common import run_command
from nit_lightning.evaluation.features import SPEC_HELP, load_feature_extractor

PROG = "python -m nit_lightning evaluate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="ADM-suite metrics of samples (npz arr_0 or PNG folder) vs REF.npz")
    parser.add_argument("--samples", required=True, help="ADM npz (arr_0 NHWC uint8) or a folder of PNGs")
    parser.add_argument("--ref", required=True, help="reference batch npz (ADM format)")
    parser.add_argument("--features", default="inception", help=SPEC_HELP)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="feature network compute dtype")
    parser.add_argument("--pr_dtype", choices=("float32", "float64"), default="float32",
                        help="precision/recall distance dtype")
    parser.add_argument("--allow_size_mismatch", action="store_true",
                        help="evaluate samples whose size differs from the reference's")
    return parser


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


def main(argv: list[str]) -> int:
    return run_command(PROG, build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from nit_lightning.evaluation.sweep import evaluate_samples

    extractor = load_feature_extractor(args.features, device=args.device, batch_size=args.batch_size,
                                       dtype=getattr(torch, args.dtype))
    result = evaluate_samples(args.samples, args.ref, extractor, batch_size=args.batch_size,
                              pr_dtype=getattr(torch, args.pr_dtype), allow_size_mismatch=args.allow_size_mismatch)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    print_table(result, title=f"{Path(args.samples).name} vs {Path(args.ref).name}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0
