"""The demo's `report.md`: metric tables per size (and per run side by side for the ablation), grids, timings, settings."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from nit_lightning.demo.data import DemoPaths
from nit_lightning.demo.evaluate import FEATURE_LABELS
from nit_lightning.demo.settings import DemoSettings

METRICS = (("fid", "FID ↓", 2), ("sfid", "sFID ↓", 2), ("is", "IS ↑", 2), ("precision", "Prec ↑", 3),
           ("recall", "Rec ↑", 3), ("class_acc", "class acc ↑", 3))


def size_kind(size: str, settings: DemoSettings) -> str:
    """seen / unseen size / unseen aspect ratio, relative to the training images (sides min..max px, 1:3..3:1)."""
    h, w = (int(v) for v in size.split("x"))
    if max(h, w) <= settings.max_side:
        return "seen"
    if h == w:
        return "unseen size"
    g = math.gcd(h, w)
    return f"unseen size, H:W {h // g}:{w // g}"


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    value = row.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def metric_table(settings: DemoSettings, metrics: dict[str, dict[str, Any]], features: str) -> list[str]:
    """One row per (size, run): the ablation's runs side by side under each size."""
    keys = [m for m in METRICS if features == "featurenet" or m[0] != "class_acc"]
    lines = [f"**{FEATURE_LABELS.get(features, features)}** — {settings.num_samples} samples per size, references "
             f"from the {int(round(settings.num_images * settings.val_fraction))} held-out val images.", "",
             "| size (HxW) | kind | run | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for size in settings.sizes:
        for run, record in metrics.items():
            row = record.get(features, {}).get(size)
            cells = " | ".join(_cell(row, k, d) for k, _, d in keys) if row else " | ".join("–" for _ in keys)
            lines.append(f"| {size} | {size_kind(size, settings)} | {run} | {cells} |")
    return lines


def mean_rows(settings: DemoSettings, metrics: dict[str, dict[str, Any]], features: str = "featurenet") -> list[str]:
    """Ablation summary: per run, the mean of each metric over seen sizes and over unseen sizes/aspect ratios."""
    lines = ["| run | sizes | FID ↓ | class acc ↑ | Prec ↑ | Rec ↑ |", "|---|---|---|---|---|---|"]
    for run, record in metrics.items():
        for group in ("seen", "unseen"):
            rows = [record.get(features, {}).get(s) for s in settings.sizes
                    if (size_kind(s, settings) == "seen") == (group == "seen")]
            rows = [r for r in rows if r]
            if not rows:
                continue
            mean = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in ("fid", "class_acc", "precision", "recall")}
            lines.append(f"| {run} | {group} ({len(rows)}) | {mean['fid']:.2f} | {mean['class_acc']:.3f} | "
                         f"{mean['precision']:.3f} | {mean['recall']:.3f} |")
    return lines


def write_report(settings: DemoSettings, paths: DemoPaths, metrics: dict[str, dict[str, Any]],
                 timings: dict[str, dict[str, Any]]) -> Path:
    """Write OUT/report.md; links are relative to OUT."""
    out = paths.out
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    runs = ", ".join(f"`{r}` ({' + '.join(m)})" for r, m in settings.runs().items())
    lines = ["# nit-lightning CPU demo", "",
             f"Runs: {runs}. "
             f"Codec `{settings.codec}` (C = 192 per token). Training sides {settings.min_side}–{settings.max_side} px, "
             "aspect ratios 1:3–3:1; sizes beyond that are unseen.", "",
             "## Metrics", "",
             "> Feature net: **demo CNN, not Inception** — a small classifier trained on the demo's own training images. "
             "Its FID/sFID/IS are only comparable between the rows of this report, never with published numbers.", ""]
    features = sorted({f for record in metrics.values() for f in record}, key=lambda f: f != "featurenet")
    for name in features:
        lines += metric_table(settings, metrics, name) + [""]
    if settings.ablation and "featurenet" in features:
        lines += ["### Ablation summary (mean over sizes; feature net: demo CNN, not Inception)", ""]
        lines += mean_rows(settings, metrics) + [""]
    lines += ["## Sample grids (EMA weights, one image per class, fixed seeds)", ""]
    for run in settings.runs():
        grids = sorted((paths.run(run) / "grids").glob("step*.png"))
        last_step = grids[-1].name.split("_")[0] if grids else None
        for grid in [g for g in grids if g.name.startswith(f"{last_step}_")]:
            size = grid.stem.split("_", 1)[1]
            lines += [f"`{run}`, {size} ({size_kind(size, settings)}), {last_step}: [{rel(grid)}]({rel(grid)})", "",
                      f"![{run} {size}]({rel(grid)})", ""]
    lines += ["", "## TensorBoard", ""]
    lines += [f"    tensorboard --logdir {paths.runs}", ""]
    lines += ["## Timings (wall clock; load average = other processes on the same cores)", "",
              "| step | seconds | load at start | status |", "|---|---|---|---|"]
    for name, record in timings.items():
        status = record.get("status", "") + (" (reused this time)" if record.get("reused_now") else "")
        lines.append(f"| {name} | {record.get('seconds')} | {record.get('load_start')} | {status} |")
    lines += [f"| **total** | {round(sum(r.get('seconds', 0) for r in timings.values()), 1)} | | |", "",
              "## Settings", "", "```json", json.dumps(settings.as_dict(), indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
