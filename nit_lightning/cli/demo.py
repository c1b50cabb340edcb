"""`python -m nit_lightning demo`: the CPU end-to-end demo (synth, prepare, fit, sample, evaluate, report)."""
from __future__ import annotations

import argparse

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.demo.settings import make_settings


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("demo",
        "End-to-end CPU demo on a synthetic native-resolution set: synth -> prepare -> fit (EMA, "
                    "TensorBoard, sample grids) -> sample at seen/unseen sizes and aspect ratios -> metrics with a "
                    "demo feature net (not Inception) -> OUT/report.md. Resumable: finished steps are reused.")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--ablation", action="store_true",
                        help="train and evaluate three data mixtures: native, mix (native + fixed), fixed only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (about a minute; for tests)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 1200; quick 12)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples per size, a multiple of the class count (default 50; quick 8)")
    parser.add_argument("--config", default=None, help="base training YAML (default experiments/demo.yaml)")
    return parser


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)


def _run(args) -> int:
    overrides = {"threads": args.threads}
    if args.steps is not None:
        overrides["train_steps"] = args.steps
    if args.num_samples is not None:
        overrides["num_samples"] = args.num_samples
    if args.config is not None:
        overrides["config"] = args.config
    from nit_lightning.demo.pipeline import run_demo

    settings = make_settings(args.out, ablation=args.ablation, quick=args.quick, **overrides)
    run_demo(settings)
    return 0
