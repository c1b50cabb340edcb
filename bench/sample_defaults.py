"""`sample` with no sampler flags on the trained demo model, against the defaults before checkpoints carried their
recipe (issue 22 item 1: Euler 50, CFG 1, no RoPE interpolation tiled the object 2x2 at 256²).

    make demo && PYTHONPATH=. python bench/sample_defaults.py --demo-out demo_out --sizes 192x192,256x256

Runs the real `sample` command twice per size into --out: once as a new user would (only --ckpt, --sizes,
--num-samples, --out) and once with the old defaults spelled out; scores both with the demo's classifiers (class and
shape accuracy, ± binomial standard error) beside the demo's own figure for the size where it has one. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

OLD_DEFAULTS = ["--method", "euler", "--steps", "50", "--cfg", "1.0", "--no-rope-interp"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--demo-out", default="demo_out", help="a finished `make demo` folder (default demo_out)")
    p.add_argument("--run", default="native", help="the demo run whose final.ckpt is sampled (default native)")
    p.add_argument("--sizes", default="192x192,256x256", help="HxW,... (default 192x192,256x256)")
    p.add_argument("--num-samples", type=int, default=50, help="per size and setting (default 50, the demo's)")
    p.add_argument("--out", default="/tmp/nit_sample_defaults",
                   help="sample folders (default /tmp/nit_sample_defaults)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    return p.parse_args(argv)


def rate(p: float, n: int) -> str:
    return f"{p:.3f} ± {math.sqrt(max(p * (1 - p), 0.0) / n):.3f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from nit_lightning.cli.sample import main as sample_main
    from nit_lightning.demo.steps import accuracy_metrics

    torch.set_num_threads(args.threads)
    demo = Path(args.demo_out)
    ckpt = demo / "runs" / args.run / "checkpoints" / "final.ckpt"
    for needed in (ckpt, demo / "eval" / "featurenet.pt", demo / "eval" / "shape.pt"):
        if not needed.is_file():
            raise SystemExit(f"{needed} not found: run `make demo` first (or pass --demo-out)")
    scores = accuracy_metrics(demo / "eval" / "featurenet.pt", demo / "eval" / "shape.pt")
    metrics_path = demo / "runs" / args.run / "metrics.json"
    demo_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    rows = []
    for size in args.sizes.split(","):
        for label, extra in (("defaults (checkpoint recipe)", []), ("old defaults: euler 50, cfg 1, no RoPE interp",
                                                                     OLD_DEFAULTS)):
            out = Path(args.out) / ("recipe" if not extra else "old") / size
            start = time.perf_counter()
            code = sample_main(["--ckpt", str(ckpt), "--sizes", size, "--num-samples", str(args.num_samples),
                                "--out", str(out), "--device", "cpu", "--no-progress", *extra])
            if code != 0:
                raise SystemExit(f"sample exited {code} for {size} ({label})")
            seconds = time.perf_counter() - start
            npz = next((out / size).glob("samples_*.npz"))
            row = {"size": size, "setting": label, "seconds": round(seconds, 1),
                   **{k: fn(npz) for k, fn in scores.items()}}
            row["demo_shape_acc"] = demo_metrics.get("featurenet", {}).get(size, {}).get("shape_acc")
            rows.append(row)
            print(json.dumps(row), flush=True)
    n = args.num_samples
    print("\n| size | `sample` settings | shape acc | class acc | the demo's shape acc | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        demo_acc = "–" if r["demo_shape_acc"] is None else f"{r['demo_shape_acc']:.3f}"
        print(f"| {r['size']} | {r['setting']} | {rate(r['shape_acc'], n)} | {rate(r['class_acc'], n)} | {demo_acc} "
              f"| {r['seconds']} |")


if __name__ == "__main__":
    main()
