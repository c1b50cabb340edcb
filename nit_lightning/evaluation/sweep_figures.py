"""The pictures of a sweep: each metric against side length and against aspect ratio (ours beside the published values
of the sweep file), and a sample grid per setting; returned as the markdown that `results.md` embeds.

    OUT/plots/metrics_vs_side.png, OUT/plots/metrics_vs_aspect.png, OUT/<HxW>/grid.png
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nit_lightning.evaluation.plots import metric_charts
from nit_lightning.generation.grid import class_columns, write_grid
from nit_lightning.generation.recipe import MAX_DEFAULT_SAMPLES
from nit_lightning.generation.sample_set import first_images
from nit_lightning.generation.settings import SizeSetting

log = logging.getLogger(__name__)


def write_sweep_figures(out: str | Path, summary: dict[str, Any], settings: Sequence[SizeSetting],
                        metrics: Sequence[str]) -> str:
    """Charts and per-setting grids of the finished settings; the markdown section that shows them."""
    out = Path(out)
    ok = {s.name: s for s in settings if summary["results"].get(s.name, {}).get("status") == "ok"}
    ours = {s.size: summary["results"][name]["metrics"] for name, s in ok.items()}
    published = {s.size: s.published for s in ok.values() if s.published}
    charts = metric_charts({"ours": ours}, metrics, out / "plots", published=published,
                           published_label=f"published ({summary.get('published_model') or 'paper'})",
                           title=f"sweep {summary.get('name') or ''}: {summary['num']} samples per setting")
    lines = ["", "## Charts", ""] if charts else []
    lines += [f"![{path.stem}]({path.relative_to(out).as_posix()})" for path in charts]
    grids = [_setting_grid(out, setting) for setting in ok.values()]
    grids = [g for g in grids if g is not None]
    if grids:
        lines += ["", "## Samples (the first image of each class, per setting)", ""]
        lines += [f"![{path.parent.name}]({path.relative_to(out).as_posix()})" for path in grids]
    return "\n".join(lines) + ("\n" if lines else "")


def _setting_grid(out: Path, setting: SizeSetting) -> Path | None:
    """OUT/<HxW>/grid.png: one row, the first image of each class (labels i mod K), at most 16."""
    found = sorted((out / "samples" / setting.name).glob(f"samples_*x{setting.size[0]}x{setting.size[1]}x3.npz"))
    if not found:  # samples made elsewhere (a sample_fn) or removed: nothing to show, nothing to fail
        log.info("sweep %s: no sample npz under %s, no grid", setting.name, out / "samples" / setting.name)
        return None
    images = first_images(found[-1], MAX_DEFAULT_SAMPLES)
    with np.load(found[-1], allow_pickle=False) as data:
        labels = data["arr_1"][:len(images)]
    classes = len(set(labels.tolist()))
    return write_grid(out / setting.name / "grid.png", [(setting.name, list(images[:classes]))],
                      class_columns(classes, classes), title=setting.sampler.describe())
