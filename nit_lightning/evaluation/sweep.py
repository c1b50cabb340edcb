"""Resolution / aspect-ratio sweeps: for each setting, sample (or reuse) a set, evaluate it, tabulate with the paper.

Layout of a sweep output folder OUT:
  OUT/samples/<HxW>/...     sample sets as the `sample` command writes them (PNGs + ADM npz, resumable, provenance)
  OUT/<HxW>/result.json     one setting's metrics and what made them (a finished setting is reused on rerun)
  OUT/results.json, OUT/results.md, OUT/tb/   all settings, a paper-style table with published numbers, TensorBoard
  OUT/plots/*.png, OUT/<HxW>/grid.png          charts against side and aspect ratio, sample grids (sweep_figures.py)
References are looked up as REF_DIR/<HxW>.npz (e.g. references/256x256.npz, references/480x640.npz; H x W).
results.json and results.md gather every setting ever finished into OUT, not only this run's: a run with --sizes,
a rerun, or array tasks finishing at the same moment merge their rows under a lock (OUT/.results.lock), re-reading
results.json inside it; this run's rows replace those of the same setting.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from nit_lightning import distributed
from nit_lightning.evaluation.evaluate import NOT_INCEPTION, evaluate_samples
from nit_lightning.evaluation.extractors import FeatureExtractor, is_reference_grade
from nit_lightning.evaluation.sweep_figures import write_sweep_figures
from nit_lightning.generation.pipeline import Pipeline
from nit_lightning.generation.sample_set import write_sample_set
from nit_lightning.generation.settings import Sweep, SizeSetting, setting_from_dict, upgrade_sampler_record
from nit_lightning.records import SettingsRecord, plain, read_json, write_json, write_text
from nit_lightning.records.lock import waiting_lock
from nit_lightning.records.names import WEIGHTS_DOCS

log = logging.getLogger(__name__)
METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall")
SampleFn = Callable[[SizeSetting, Path], Path]  # (setting, samples folder) -> that setting's ADM npz
ExtraMetric = Callable[[Path], float]  # a setting's ADM npz -> one number (e.g. a classifier's accuracy)


def run_sweep(sweep: Sweep, *, ref_dir: str | Path, out: str | Path, num: int, extractor: FeatureExtractor,
              pipeline: Pipeline | None = None, sample_fn: SampleFn | None = None, seed: int = 0,
              tokens_per_forward: int = 16384, tb: bool = True, pr_dtype: torch.dtype = torch.float32,
              extra_metrics: dict[str, ExtraMetric] | None = None) -> dict[str, Any]:
    """Sample + evaluate every setting; resumable per setting; a failing setting is reported, the others still run.

    A finished setting is reused only when its record matches: the setting, num, seed, features, the names of the
    extra metrics and the weights (`pipeline.meta["weights_sha256"]`), so a replaced checkpoint is never mixed with
    old results. `extra_metrics` {name: fn(npz) -> float} add columns to the table and scalars to TensorBoard.
    """
    extra_metrics = dict(extra_metrics or {})
    if pipeline is None and sample_fn is None:
        raise ValueError("run_sweep needs a pipeline to sample with (or a sample_fn)")
    ranks = distributed.current()
    if sample_fn is None:
        def sample_fn(setting: SizeSetting, samples: Path) -> Path:
            return write_sample_set(pipeline, setting, samples / setting.name, num=num, seed=seed,
                                    tokens_per_forward=tokens_per_forward, ranks=ranks, source=pipeline.meta.get("source"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = pipeline.meta.get("weights_sha256") if pipeline is not None else None
    results: dict[str, Any] = {}
    for setting in sweep.settings:
        name = setting.name
        done_file = out / name / "result.json"
        config = {"setting": setting.as_dict(), "num": num, "seed": seed, "features": extractor.name,
                  "weights_sha256": weights, **({"extra_metrics": sorted(extra_metrics)} if extra_metrics else {})}
        previous = _finished(done_file)
        if previous is not None:
            recorded = dict(previous.get("config") or {})
            if isinstance(recorded.get("setting"), dict):  # a result written before one spelling per setting
                recorded["setting"] = upgrade_sampler_record(recorded["setting"])
            if SettingsRecord("sweep-result", config).same_as(recorded) and previous.get("status") == "ok":
                log.info("sweep %s: reusing the finished result in %s", name, done_file)
                results[name] = previous
                continue
        done_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            ref_path = Path(ref_dir) / f"{name}.npz"
            if not ref_path.is_file():
                raise FileNotFoundError(f"no reference for {name}: expected {ref_path} (ADM's 256/512: {WEIGHTS_DOCS}; "
                                        f"build others with `python -m nit_lightning reference build --size {name} "
                                        f"--out {ref_path} ...`)")
            samples = sample_fn(setting, out / "samples")
            if not ranks.is_main:  # under torchrun every rank samples its share; rank 0 alone evaluates and writes
                results[name] = {"status": "sampled", "config": config}
                continue
            metrics = evaluate_samples(samples, ref_path, extractor, pr_dtype=pr_dtype)
            if metrics["num_samples"] != num:
                raise RuntimeError(f"{samples} holds {metrics['num_samples']} samples, the sweep asked for {num}")
            metrics.update({key: float(fn(samples)) for key, fn in extra_metrics.items()})
            record = {"status": "ok", "config": config, "metrics": metrics, "published": setting.published}
            write_json(done_file, record, indent=2)
        except Exception as error:  # one setting's failure must not stop the others; it is reported and counted
            log.error("sweep %s failed: %s", name, error)
            record = {"status": "failed", "config": config, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        results[name] = record
    if not ranks.is_main:
        return {"results": results}
    summary = {"name": sweep.name, "published_model": sweep.published_model, "num": num, "features": extractor.name,
               "results": results}
    summary = write_results(out, summary, list(extra_metrics))
    if tb:
        _log_tensorboard(out / "tb", results, METRIC_KEYS + tuple(extra_metrics))
    return summary


def _finished(done_file: Path) -> dict[str, Any] | None:
    """A setting's earlier result, or None: none yet, or a damaged file (said, and the setting is done again)."""
    if not done_file.is_file():
        return None
    try:
        return read_json(done_file, "sweep result")
    except ValueError as error:
        log.warning("%s; the setting is evaluated again", error)
        return None


def write_results(out: Path, summary: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Merge this run's rows into OUT/results.json (rows of other settings kept), then render results.md from it.

    Under a lock with a re-read inside it, so that array tasks finishing together each add their row; the merged
    summary is returned. Kept rows measured with other settings than this run's (num, seed, features, weights) are
    named in a warning and under the table.
    """
    summary = plain(summary)  # numpy scalars -> plain JSON values
    with waiting_lock(out / ".results.lock"):
        previous: dict[str, Any] = {}
        if (out / "results.json").is_file():
            try:
                previous = read_json(out / "results.json", "sweep table").get("results", {})
            except (OSError, ValueError) as error:  # a damaged table is rebuilt from this run's rows, loudly
                log.warning("sweep: %s/results.json is unreadable (%s): it is rewritten with this run's rows only",
                            out, error)
        mine = summary["results"]
        summary["results"] = {**{k: v for k, v in previous.items() if k not in mine},
                              **{k: _merged_row(k, v, previous.get(k)) for k, v in mine.items()}}
        write_json(out / "results.json", summary, indent=2)
        settings = sorted((setting_from_dict(r["config"]["setting"]) for r in summary["results"].values()),
                          key=lambda setting: setting.size)  # height, then width: the order of the paper's sweeps
        figures = write_sweep_figures(out, summary, settings, METRIC_KEYS + tuple(extra))
        write_text(out / "results.md", results_markdown(summary, settings, extra, others=_other_runs(summary, mine))
                   + figures)
    return summary


def _merged_row(name: str, mine: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """This run's row, except where it failed and the table holds a finished row of the same settings (another
    task of the same sweep, e.g. one that found the sample folder locked by the first): the finished row stays."""
    if (mine.get("status") != "ok" and isinstance(theirs, dict) and theirs.get("status") == "ok"
            and SettingsRecord("sweep-result", mine.get("config") or {}).same_as(theirs.get("config"))):
        log.warning("sweep %s: this run did not finish it (%s); the table keeps the finished row of the same "
                    "settings", name, mine.get("error", mine.get("status")))
        return theirs
    return mine


def _other_runs(summary: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Kept rows made with another num / seed / features / weights than this run's, as 'size (key: theirs)'."""
    reference = next((r["config"] for r in mine.values()), None)
    notes = []
    for name, record in summary["results"].items():
        if name in mine or reference is None:
            continue
        differ = [f"{k}: {record['config'].get(k)}" for k in ("num", "seed", "features", "weights_sha256")
                  if record["config"].get(k) != reference.get(k)]
        if differ:
            notes.append(f"{name} ({', '.join(differ)})")
    if notes:
        log.warning("sweep: results.md keeps rows of earlier runs made with other settings: %s", "; ".join(notes))
    return notes


def _fmt(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(ours: Any, published: Any, digits: int) -> str:
    """'2.31 (2.16)' with a published value, '2.31' without (no empty parentheses)."""
    return _fmt(ours, digits) + ("" if published is None else f" ({_fmt(published, digits)})")


def solver_cells(sampler: Any) -> str:
    """'heun 8 | 15 (9 with CFG)': solver and steps, then NFE = network evaluations per image (model calls; the CFG
    null branch runs inside the same call on a doubled sequence in the calls counted in parentheses)."""
    nfe, guided = sampler.nfe
    return f"{sampler.method} {sampler.steps} | {nfe}" + (f" ({guided} with CFG)" if guided else "")


def results_markdown(summary: dict[str, Any], settings: list[SizeSetting], extra: list[str] | None = None,
                     others: list[str] | None = None) -> str:
    """A paper-style table: ours, with the published numbers in parentheses where the sweep file has them; then the
    `extra` metric columns. `others`: rows kept from earlier runs with other settings, named under the table."""
    extra = list(extra or [])
    published = any(s.published for s in settings)
    lines = [f"# Sweep {summary.get('name') or ''}: {summary['num']} samples per setting", "",
             f"Features: `{summary['features']}`" + ("" if is_reference_grade(summary["features"])
                                                     else f" — **{NOT_INCEPTION}**"),
             (f"Published numbers (in parentheses): {summary.get('published_model') or 'the sweep file'}"
              if published else "No published numbers in the sweep file."),
             "NFE: network evaluations per image (Heun: 2·steps − 1); in parentheses, how many of them also run CFG's "
             "null branch (the same call on a doubled sequence: twice the tokens).", "",
             "| size (HxW) | solver, steps | NFE | CFG | interval | N | FID | sFID | IS | Prec | Rec |"
             + "".join(f" {key} |" for key in extra),
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    digits = {"fid": 2, "sfid": 2, "is": 2, "precision": 3, "recall": 3}
    for setting in settings:
        record = summary["results"].get(setting.name, {})
        sampler = setting.sampler
        lo, hi = sampler.cfg_interval
        head = f"| {setting.name} | {solver_cells(sampler)} | {sampler.cfg_scale:g} | [{lo:g}, {hi:g}] |"
        if record.get("status") != "ok":
            lines.append(f"{head} – | failed: {record.get('error', 'not run')[:80]} | | | | |" + " |" * len(extra))
            continue
        m, pub = record["metrics"], setting.published
        cells = [_cell(m.get(k), pub.get(k), digits[k]) for k in METRIC_KEYS]
        cells += [_fmt(m.get(k), 3) for k in extra]
        lines.append(f"{head} {m['num_samples']} | " + " | ".join(cells) + " |")
    if others:
        lines += ["", "Rows kept from earlier runs with other settings than the last run's: " + "; ".join(others)]
    return "\n".join(lines) + "\n"


def _log_tensorboard(log_dir: Path, results: dict[str, Any], keys: tuple[str, ...]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        log.warning("tensorboard not installed: no TensorBoard scalars written")
        return
    with SummaryWriter(str(log_dir)) as writer:
        for name, record in results.items():
            if record.get("status") == "ok":
                for key in keys:
                    if key in record["metrics"]:
                        writer.add_scalar(f"sweep/{name}/{key}", record["metrics"][key], 0)
