"""The demo's outputs for people: step timings, OUT/report.md (metrics, ablation summary, grids), the console summary."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.records import read_json, write_json, write_text

if TYPE_CHECKING:
    from nit_lightning.demo.steps import Demo

FEATURE_LABELS = {"featurenet": "feature net: demo CNN, not Inception", "inception": "Inception-v3 (FID network)"}
METRICS = (("fid", "FID ↓", 2), ("sfid", "sFID ↓", 2), ("is", "IS ↑", 2), ("precision", "Prec ↑", 3),
           ("recall", "Rec ↑", 3), ("class_acc", "class acc ↑", 3), ("shape_acc", "shape acc ↑", 3))
REAL_PER_CLASS = 5  # held-out real images per class and size for the shape classifier's ceiling


def run_name(mixture: str, seed: int, base_seed: int) -> str:
    """An ablation run's folder name: the mixture alone for the config's own seed, else `<mixture>-s<seed>`."""
    return mixture if seed == base_seed else f"{mixture}-s{seed}"


def load_average() -> float | None:
    """1-minute load average (other processes on the 2 cores make every timing pessimistic); None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def stamp(path: Path) -> str:
    """Path, size and mtime: a rebuilt sample npz or reference invalidates the metrics computed from it."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class StepTimer:
    """Times named steps and keeps them in OUT/timings.json, so a resumed demo still reports what was measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = read_json(path, "demo timings") if path.is_file() else {}

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[dict[str, Any]]:
        """Context for one step; set `info["status"] = "reused"` inside when its outputs already existed."""
        load = load_average()
        print(f"\n=== {name}: {title} (load average {load}) ===", flush=True)
        info: dict[str, Any] = {"status": "ran"}
        start = time.perf_counter()
        yield info
        seconds = round(time.perf_counter() - start, 1)
        if info["status"] == "reused" and name in self.records:
            self.records[name] = {**self.records[name], "reused_now": True}
            print(f"--- {name}: outputs exist, reused (measured before: {self.records[name].get('seconds')} s)")
        else:
            self.records[name] = {"title": title, "seconds": seconds, "load_start": load, "load_end": load_average(),
                                  **info}
            print(f"--- {name}: {info['status']} in {seconds} s", flush=True)
        write_json(self.path, self.records)


def banner(demo: Demo) -> None:
    runs = ", ".join(demo.runs())
    print(f"nit-lightning demo -> {demo.out.resolve()} (runs: {runs}; load average {load_average()})", flush=True)


def size_kind(size: str, demo: Demo) -> str:
    """seen / unseen size / unseen aspect ratio, relative to the training images (sides min..max px, 1:3..3:1)."""
    h, w = parse_size(size)
    if max(h, w) <= int(demo.config["images"]["max_side"]):
        return "seen"
    if h == w:
        return "unseen size"
    g = math.gcd(h, w)
    return f"unseen size, H:W {h // g}:{w // g}"


def real_shape_accuracy(demo: Demo, shape: Path) -> dict[str, Any]:
    """The shape classifier on the held-out val images, and on real images drawn at each sample size with held-out
    seeds (the ceiling of the samples): {"heldout": acc, "sizes": {"HxW": acc}}."""
    from nit_lightning.data.synthetic import render
    from nit_lightning.evaluation.classifiers import shape_accuracy

    k = int(demo.config["images"]["num_classes"])
    out = {}
    for size in demo.sizes:
        labels = [c for c in range(k) for _ in range(REAL_PER_CLASS)]
        images = np.stack([render(c, size, np.random.default_rng([int(demo.config["seed"]), 0xE7A1, i]))
                           for i, c in enumerate(labels)])
        out[format_size(size)] = shape_accuracy(images, labels, shape)
    return {"heldout": heldout_shape_accuracy(demo, shape), "sizes": out}


def heldout_shape_accuracy(demo: Demo, shape: Path) -> float:
    """The shape classifier on the held-out val images at their native sizes (it never saw them)."""
    from nit_lightning.data.imageops import read_rgb
    from nit_lightning.data.listing import list_labelled_images
    from nit_lightning.evaluation.classifiers import shape_accuracy

    listing = list_labelled_images(demo.images / "val")
    images = [torch.from_numpy(read_rgb(demo.images / "val" / rel).copy()).permute(2, 0, 1) for rel, _ in listing.items]
    return shape_accuracy(images, [label for _, label in listing.items], shape)


def samples_grid(demo: Demo, run: str, samples: dict[str, Path]) -> Path:
    """runs/<run>/samples_grid.png: one row per size, the first sample of each class, labelled (the picture of a run)."""
    from nit_lightning.generation.sample_set import write_sample_grid

    return write_sample_grid(demo.out / "runs" / run / "samples_grid.png", samples,
                             int(demo.config["images"]["num_classes"]), title=f"{run}: EMA weights, the checkpoint's recipe")


def charts(demo: Demo, metrics: dict[str, Any]) -> list[Path]:
    """OUT/plots/metrics_vs_{side,aspect}.png: every feature-net metric per run against side and aspect ratio."""
    from nit_lightning.evaluation.plots import metric_charts

    series = {run: {parse_size(size): row for size, row in record.get("featurenet", {}).items()}
              for run, record in metrics.items()}
    chance = 1.0 / int(demo.config["images"]["num_classes"])
    return metric_charts(series, [key for key, _, _ in METRICS], demo.out / "plots",
                         chance={"class_acc": chance, "shape_acc": chance},
                         title=f"demo: {demo.config['sample']['num_samples']} samples per size (demo CNNs, not Inception)")


def _cell(row: dict[str, Any] | None, key: str, digits: int) -> str:
    value = (row or {}).get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def metric_table(demo: Demo, metrics: dict[str, Any], features: str, real: dict[str, Any]) -> list[str]:
    """One row per (size, run): the ablation's runs side by side under each size."""
    keys = [m for m in METRICS if features == "featurenet" or m[0] not in ("class_acc", "shape_acc")]
    n = int(demo.config["sample"]["num_samples"])
    lines = [f"**{FEATURE_LABELS.get(features, features)}** — {n} samples per size; "
             "references from the held-out val images."
             + (f" Shape classifier on the held-out val images: {real['heldout']:.3f}; on real images drawn at each size "
                "(the ceiling): " + ", ".join(f"{s} {v:.2f}" for s, v in real["sizes"].items()) + "."
                + f" An accuracy near 0.8 over {n} samples has a standard error of "
                f"{math.sqrt(0.8 * 0.2 / n):.2f}: one more or one fewer sample is {1 / n:.2f}."
                if features == "featurenet" else ""), "",
             "| size (HxW) | kind | run | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for size in map(format_size, demo.sizes):
        for run, record in metrics.items():
            row = record.get(features, {}).get(size)
            lines.append(f"| {size} | {size_kind(size, demo)} | {run} | "
                         + " | ".join(_cell(row, k, d) for k, _, d in keys) + " |")
    return lines


def ablation_summary(demo: Demo, metrics: dict[str, Any]) -> list[str]:
    """Per data mixture: the mean over seen and over unseen sizes, per seed and over seeds (feature-net metrics)."""
    keys = ("shape_acc", "class_acc", "fid")
    lines = ["| mixture | sizes | seed | shape acc ↑ | class acc ↑ | FID ↓ |", "|---|---|---|---|---|---|"]
    for mixture in demo.config["runs"]:
        for group in ("seen", "unseen"):
            sizes = [format_size(s) for s in demo.sizes if (size_kind(format_size(s), demo) == "seen") == (group == "seen")]
            per_seed = {}
            for run, (_, seed) in demo.runs().items():
                rows = [metrics.get(run, {}).get("featurenet", {}).get(s) for s in sizes]
                if run == run_name(mixture, seed, int(demo.config["seed"])) and sizes and all(rows):
                    per_seed[seed] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
            for seed, mean in sorted(per_seed.items()):
                lines.append(f"| {mixture} | {group} ({len(sizes)}) | {seed} | {mean['shape_acc']:.3f} | "
                             f"{mean['class_acc']:.3f} | {mean['fid']:.2f} |")
            if len(per_seed) > 1:
                mean = {k: np.mean([m[k] for m in per_seed.values()]) for k in keys}
                lines.append(f"| **{mixture}** | **{group}** | **mean** | **{mean['shape_acc']:.3f}** | "
                             f"**{mean['class_acc']:.3f}** | **{mean['fid']:.2f}** |")
    return lines


def write(demo: Demo, metrics: dict[str, Any], real: dict[str, Any]) -> Path:
    """Write OUT/report.md; links are relative to OUT."""
    rel = lambda p: os.path.relpath(p, demo.out)  # noqa: E731
    runs = ", ".join(f"`{r}` ({' + '.join(m)}, seed {s})" for r, (m, s) in demo.runs().items())
    images = demo.config["images"]
    lines = ["# nit-lightning CPU demo", "",
             f"Runs: {runs}. Codec `{demo.config['codec']['spec']}`. Training images {images['min_side']}–"
             f"{images['max_side']} px, aspect ratios 1:3–3:1; sizes beyond that are unseen.", "",
             "## Metrics", "",
             "> Feature net and shape classifier: **demo CNNs, not Inception** — small classifiers trained on the demo's "
             "own training images (the shape classifier sees grayscale standardised per image: colour cannot help it). "
             "FID/sFID/IS are only comparable between the rows of this report, never with published numbers.", ""]
    features = sorted({f for record in metrics.values() for f in record}, key=lambda f: f != "featurenet")
    for name in features:
        lines += metric_table(demo, metrics, name, real) + [""]
    if demo.ablation:
        lines += ["### Ablation summary (mean over sizes; demo CNNs, not Inception)", ""]
        lines += ablation_summary(demo, metrics) + [""]
    plotted = charts(demo, metrics)
    if plotted:
        lines += ["## Charts (feature-net metrics per run; training sides up to "
                  f"{demo.config['images']['max_side']} px)", ""]
        lines += [f"![{path.stem}]({rel(path)})" for path in plotted] + [""]
    lines += ["## Samples (EMA weights): one row per size, the first sample of each class", ""]
    for run in demo.runs():
        picture = demo.out / "runs" / run / "samples_grid.png"
        if picture.is_file():
            lines += [f"`{run}`: sizes {', '.join(map(format_size, demo.sizes))} top to bottom", "",
                      f"![{run} samples]({rel(picture)})", ""]
    lines += ["## Sample grids during training (seen and unseen sizes, fixed seeds)", ""]
    for run in demo.runs():
        grids = sorted((demo.out / "runs" / run / "grids").glob("step*.png"))
        last = grids[-1].name.split("_")[0] if grids else None
        for grid in (g for g in grids if g.name.startswith(f"{last}_")):
            size = grid.stem.split("_", 1)[1]
            lines += [f"`{run}`, {size} ({size_kind(size, demo)}), {last}:", "", f"![{run} {size}]({rel(grid)})", ""]
    lines += ["## TensorBoard", "", f"    tensorboard --logdir {demo.out / 'runs'}", "",
              "## Timings (wall clock; load average = other processes on the same cores)", "",
              "| step | seconds | load at start | status |", "|---|---|---|---|"]
    for name, record in demo.timer.records.items():
        status = record.get("status", "") + (" (reused this time)" if record.get("reused_now") else "")
        lines.append(f"| {name} | {record.get('seconds')} | {record.get('load_start')} | {status} |")
    total = round(sum(r.get("seconds", 0) for r in demo.timer.records.values()), 1)
    lines += [f"| **total** | {total} | | |", "", "## Settings", "", "```json",
              json.dumps(demo.config, indent=1), "```", ""]
    return write_text(demo.out / "report.md", "\n".join(lines))


def print_summary(demo: Demo, metrics: dict[str, Any], path: Path) -> None:
    """The metric table (runs side by side) and where everything is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))  # a log file is 80 wide: the table would wrap
    table = Table(title=f"{FEATURE_LABELS['featurenet']} — {demo.config['sample']['num_samples']} samples/size")
    for column in ("size", "kind", "run", "FID", "sFID", "IS", "Prec", "Rec", "class acc", "shape acc"):
        table.add_column(column, justify="left" if column in ("size", "kind", "run") else "right")
    for size in map(format_size, demo.sizes):
        for run, record in metrics.items():
            row = record.get("featurenet", {}).get(size)
            table.add_row(size, size_kind(size, demo), run, *(_cell(row, k, d) for k, _, d in METRICS))
    console.print(table)
    total = round(sum(r.get("seconds", 0) for r in demo.timer.records.values()), 1)
    print(f"\ndemo steps took {total} s in all (timings.json)")
    print(f"report:       {path}")
    print(f"grids:        {demo.out / 'runs'}/<run>/grids/*.png")
    print(f"samples:      {demo.out / 'runs'}/<run>/samples/<HxW>/")
    print(f"checkpoints:  {demo.out / 'runs'}/<run>/checkpoints/final.ckpt")
    print(f"TensorBoard:  tensorboard --logdir {demo.out / 'runs'}")
