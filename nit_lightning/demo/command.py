"""`python -m nit_lightning demo`: the command over nit_lightning.demo.run (the demo is a layer above the commands)."""
from __future__ import annotations

import argparse

from nit_lightning.cli.common import parser as make_parser
from nit_lightning.cli.common import run_command
from nit_lightning.demo.config import load_config
from nit_lightning.demo.run import __doc__ as RUN_DOC
from nit_lightning.demo.run import run_demo, run_demo_sweep


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("demo", RUN_DOC)
    p.add_argument("--config", default="experiments/demo.yaml", help="the demo's config (default experiments/demo.yaml)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--ablation", action="store_true", help="train every data mixture of the config, for each seed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the config's)")
    p.add_argument("--sweep", default=None, help="a demo-scale sweep file: sample + evaluate the trained demo model "
                                                  "(default: none, run the demo)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    config = load_config(args.config)
    if config.get("kind") == "t2i":  # experiments/demo_t2i.yaml: the NiT-T2I demo (demo/t2i.py)
        if args.sweep or args.ablation:
            raise ValueError("--sweep and --ablation belong to the class-conditional demo; the T2I demo has neither")
        from nit_lightning.demo.t2i import run_t2i_demo

        result = run_t2i_demo(config, args.out, threads=args.threads)
        missed = [g for g, v in result["goals"].items() if not v["met"]]
        if missed:
            print(f"T2I demo: goals not met for {', '.join(missed)} (report: {result['report']})")
        return 0
    if args.sweep:
        return run_demo_sweep(config, args.out, args.sweep, args.threads)
    run_demo(config, args.out, ablation=args.ablation, threads=args.threads)
    return 0


def main(argv: list[str]) -> int:
    return run_command(build_parser(), _run, argv)
