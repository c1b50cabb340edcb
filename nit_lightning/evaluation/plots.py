"""Charts of a metric against side length and against aspect ratio (the paper's two pictures), ours beside the
published values where there are any; matplotlib with the Agg backend (files only, no display).

    metric_charts({"ours": {(256, 256): {"fid": 2.3}, ...}}, ["fid", ...], out_dir, published={(256, 256): {...}})
    -> [out_dir/metrics_vs_side.png, out_dir/metrics_vs_aspect.png]  (each only when the sizes allow it)

Side chart: the square sizes (at least two sides). Aspect-ratio chart: the non-square sizes plus the square whose area
is closest to theirs (x = H:W on a log scale), when there are at least two ratios.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from nit_lightning.data.sizes import format_size
from nit_lightning.records import write_with

Size = tuple[int, int]
Series = Mapping[str, Mapping[Size, Mapping[str, float]]]  # label -> size -> metric -> value
LABELS = {"fid": "FID ↓", "sfid": "sFID ↓", "is": "IS ↑", "precision": "precision ↑", "recall": "recall ↑",
          "class_acc": "class accuracy ↑", "shape_acc": "shape accuracy ↑"}
FRACTIONS = {"precision", "recall", "class_acc", "shape_acc"}  # drawn on [0, 1]: a small wobble must not look large
PUBLISHED_STYLE = {"linestyle": "--", "marker": "o", "markerfacecolor": "white", "color": "0.35"}


def side_sizes(sizes: Sequence[Size]) -> list[Size]:
    """The square sizes, by side; empty unless there are two or more."""
    squares = sorted({s for s in sizes if s[0] == s[1]})
    return squares if len(squares) >= 2 else []


def aspect_sizes(sizes: Sequence[Size]) -> list[Size]:
    """The non-square sizes plus the square closest to their mean area, by H/W; empty unless two ratios or more."""
    others = [s for s in dict.fromkeys(sizes) if s[0] != s[1]]
    squares = [s for s in dict.fromkeys(sizes) if s[0] == s[1]]
    if others and squares:
        area = sum(h * w for h, w in others) / len(others)
        others.append(min(squares, key=lambda s: abs(math.log(s[0] * s[1] / area))))
    chosen = sorted(others, key=lambda s: s[0] / s[1])
    return chosen if len({h / w for h, w in chosen}) >= 2 else []


def metric_charts(series: Series, metrics: Sequence[str], out_dir: str | Path, *,
                  published: Mapping[Size, Mapping[str, float]] | None = None, published_label: str = "published",
                  chance: Mapping[str, float] | None = None, title: str | None = None) -> list[Path]:
    """Write metrics_vs_side.png and metrics_vs_aspect.png into out_dir (where the sizes allow); returns the paths."""
    sizes = [size for points in series.values() for size in points]
    out_dir = Path(out_dir)
    written = []
    for name, chosen, axis in (("metrics_vs_side.png", side_sizes(sizes), "side"),
                               ("metrics_vs_aspect.png", aspect_sizes(sizes), "aspect")):
        shown = [m for m in metrics if any(m in points.get(s, {}) for points in series.values() for s in chosen)]
        if chosen and shown:
            figure = metric_figure(series, shown, chosen, axis, published or {}, published_label, chance or {}, title)
            written.append(_save(figure, out_dir / name))
    return written


def _x(size: Size, axis: str) -> float:
    return float(size[0]) if axis == "side" else math.log2(size[0] / size[1])


def metric_figure(series: Series, metrics: Sequence[str], sizes: list[Size], axis: str,
            published: Mapping[Size, Mapping[str, float]], published_label: str, chance: Mapping[str, float],
            title: str | None):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, nothing opens a window
    from matplotlib.figure import Figure

    columns = min(len(metrics), 4)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for label, points in series.items():
            xs = [(_x(s, axis), points[s][metric]) for s in sizes if metric in points.get(s, {})]
            if xs:
                ax.plot(*zip(*xs), marker="o", label=label)
        ref = [(_x(s, axis), published[s][metric]) for s in sizes if metric in published.get(s, {})]
        if ref:
            ax.plot(*zip(*ref), label=published_label, **PUBLISHED_STYLE)
        if metric in chance:
            ax.axhline(chance[metric], color="0.6", linestyle=":", label="chance")
        ax.set_title(LABELS.get(metric, metric))
        if metric in FRACTIONS:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xticks([_x(s, axis) for s in sizes])
        ax.set_xticklabels([f"{s[0]}" if axis == "side" else format_size(s) for s in sizes],
                           rotation=0 if axis == "side" else 45, fontsize=8)
        ax.set_xlabel("side (px)" if axis == "side" else "H x W (by H:W, log scale)")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def _save(figure, path: Path) -> Path:
    return write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
