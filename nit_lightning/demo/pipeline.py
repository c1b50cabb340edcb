"""The demo's steps in order, each timed and skipped when its outputs exist (the demo is resumable)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from nit_lightning.demo import data, evaluate, report, train
from nit_lightning.demo.settings import DemoSettings
from nit_lightning.demo.timing import StepTimer, load_average

log = logging.getLogger(__name__)
# Flags that change which steps run or how fast, not what a finished step computed: a resume may change them.
RUN_FLAGS = ("out", "ablation", "threads")


def check_settings(settings: DemoSettings, out: Path) -> None:
    """Refuse to resume into an OUT made with other settings (its outputs would mix); record them otherwise."""
    path = out / "settings.json"
    now = {k: v for k, v in json.loads(json.dumps(settings.as_dict())).items() if k not in RUN_FLAGS}
    if path.is_file():
        before = {k: v for k, v in json.loads(path.read_text()).items() if k not in RUN_FLAGS}
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a demo made with other settings {diff} (before, now); use another --out "
                             f"or delete {out}")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.as_dict(), indent=1))


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run (or resume) the whole demo; returns {"report": path, "metrics": {run: ...}, "timings": {...}}."""
    torch.set_num_threads(settings.threads)
    paths = data.DemoPaths(settings.out)
    check_settings(settings, paths.out)
    timer = StepTimer(paths.out / "timings.json")
    start = time.perf_counter()
    runs = ("ablation: " + ", ".join(settings.runs())) if settings.ablation else "native run"
    print(f"nit-lightning demo -> {paths.out.resolve()} ({runs}{', quick' if settings.quick else ''}; "
          f"torch threads {settings.threads}, load average {load_average()})")

    with timer.step("1-synth", f"{settings.num_images} synthetic images, {settings.num_classes} classes") as info:
        data.make_images(settings, paths, info)
    for mode in settings.modes():
        with timer.step(f"2-prepare-{mode}", f"latent shards ({settings.codec}, {mode})") as info:
            data.make_shards(settings, paths, mode, info)
    with timer.step("5a-featurenet", "demo feature net (NOT Inception) on the training images") as info:
        data.make_featurenet(settings, paths, info)
    extractors = evaluate.load_extractors(paths, data.feature_specs())
    with timer.step("5b-references", f"reference statistics for {len(settings.sizes)} sizes "
                                     f"({', '.join(extractors)})") as info:
        references = data.make_references(settings, paths, extractors, info)

    metrics: dict[str, Any] = {}
    for name, modes in settings.runs().items():
        with timer.step(f"3-train-{name}", f"fit {settings.train_steps} steps on {' + '.join(modes)}") as info:
            ckpt = train.train_run(settings, paths, name, modes, info)
        with timer.step(f"4-sample-{name}", f"{settings.num_samples} samples x {len(settings.sizes)} sizes") as info:
            samples = evaluate.sample_run(settings, paths, name, ckpt, info)
        with timer.step(f"5c-evaluate-{name}", "metrics per size") as info:
            metrics[name] = evaluate.evaluate_run(settings, paths, name, samples, extractors, references, info)
        report.write_report(settings, paths, metrics, timer.records)  # a partial report after every run

    path = report.write_report(settings, paths, metrics, timer.records)
    print_summary(settings, paths, metrics, path, time.perf_counter() - start)
    return {"report": path, "metrics": metrics, "timings": timer.records}


def print_summary(settings: DemoSettings, paths: data.DemoPaths, metrics: dict[str, Any], path: Path,
                  seconds: float) -> None:
    """The metric table (runs side by side) and where everything is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))  # a log file is 80 wide: the table would wrap
    for features in sorted({f for record in metrics.values() for f in record}, key=lambda f: f != "featurenet"):
        table = Table(title=f"{evaluate.FEATURE_LABELS.get(features, features)} — {settings.num_samples} samples/size")
        for column in ("size", "kind", "run", "FID", "sFID", "IS", "Prec", "Rec") + (
                ("class acc",) if features == "featurenet" else ()):
            table.add_column(column, justify="left" if column in ("size", "kind", "run") else "right")
        for size in settings.sizes:
            for run, record in metrics.items():
                row = record.get(features, {}).get(size, {})
                cells = [row.get(k) for k in ("fid", "sfid", "is", "precision", "recall")]
                if features == "featurenet":
                    cells.append(row.get("class_acc"))
                table.add_row(size, report.size_kind(size, settings), run,
                              *("–" if v is None else f"{v:.3f}" for v in cells))
        console.print(table)
    print(f"\ndemo finished in {seconds:.0f} s (this invocation)")
    print(f"report:       {path}")
    print(f"grids:        {paths.runs}/<run>/grids/*.png")
    print(f"samples:      {paths.runs}/<run>/samples/<HxW>/")
    print(f"checkpoints:  {paths.runs}/<run>/checkpoints/final.ckpt")
    print(f"TensorBoard:  tensorboard --logdir {paths.runs}")
