"""Evaluate sample sets against reference batches, and run resolution / aspect-ratio sweeps (sample + evaluate).

Layout of a sweep output folder OUT:
  OUT/samples/<HxW>/...     what the sample command writes (PNGs + ADM npz; it resumes and reuses finished sets)
  OUT/<HxW>/result.json     one setting's metrics and settings (a finished setting is skipped on rerun)
  OUT/results.json, OUT/results.md, OUT/tb/   all settings, a paper-style table with published numbers, TensorBoard
References are looked up as REF_DIR/<HxW>.npz (e.g. references/256x256.npz, references/480x640.npz; H x W).
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml

from nit_lightning import distributed
from nit_lightning.data.listing import list_images
from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.evaluation.features import FeatureExtractor, is_reference_grade
from nit_lightning.evaluation.metrics import ADMFeatureStats, compare
from nit_lightning.evaluation.reference import (
    Reference,
    check_extractor,
    load_reference,
    nhwc_to_tensor,
    reference_pool,
)

log = logging.getLogger(__name__)
METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall")
NOT_INCEPTION = "features are NOT the FID Inception: numbers are not comparable to published ones"


def iter_sample_batches(path: str | Path, batch_size: int = 64) -> tuple[Iterator[np.ndarray], int, tuple[int, int]]:
    """A sample set (ADM npz with arr_0 NHWC uint8, or a folder of PNGs) -> (batches, count, (H, W))."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = list_images(path)
        with Image.open(files[0]) as im:
            size = (im.height, im.width)

        def folder_batches() -> Iterator[np.ndarray]:
            for start in range(0, len(files), batch_size):
                arrays = []
                for f in files[start:start + batch_size]:
                    with Image.open(f) as im:
                        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
                    if a.shape[:2] != size:
                        raise ValueError(f"sample {f} is {a.shape[0]}x{a.shape[1]} but {files[0].name} is "
                                         f"{size[0]}x{size[1]}: a sample set must have one size")
                    arrays.append(a)
                yield np.stack(arrays)

        return folder_batches(), len(files), size
    if not path.is_file():
        raise FileNotFoundError(f"samples {str(path)!r} not found (an ADM .npz with arr_0, or a folder of PNGs)")
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise KeyError(f"{str(path)!r} has no arr_0 (keys {data.files}); expected ADM samples (N, H, W, 3) uint8")
        images = data["arr_0"]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(path)!r} arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return batches, int(images.shape[0]), (int(images.shape[1]), int(images.shape[2]))


def evaluate_batches(batches: Iterator[np.ndarray], ref: Reference, extractor: FeatureExtractor, *,
                     ref_path: str | Path = "", pr_dtype: torch.dtype = torch.float32, pr_block: int = 10000,
                     expected: int | None = None) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall of uint8 NHWC batches against a reference."""
    check_extractor(ref, extractor, ref_path)
    stats = ADMFeatureStats(extractor.dims["pool"], extractor.dims["spatial"], keep_rows=True)
    start = time.time()
    for batch in batches:
        stats.update(extractor(nhwc_to_tensor(batch)))
    sample_stats = stats.compute()
    if expected is not None and sample_stats["n"] != expected:
        raise RuntimeError(f"read {sample_stats['n']} samples but expected {expected}")
    result = compare(sample_stats, ref.stats(), reference_pool(ref, extractor), pr_block=pr_block,
                     pr_dtype=pr_dtype)
    result.update({"features": extractor.name, "reference": str(ref_path), "reference_meta": ref.meta,
                   "seconds": round(time.time() - start, 2)})
    if not is_reference_grade(extractor.name):
        result["warning"] = NOT_INCEPTION
    return result


def evaluate_samples(samples: str | Path, ref_path: str | Path, extractor: FeatureExtractor, *,
                     batch_size: int = 64, pr_dtype: torch.dtype = torch.float32,
                     allow_size_mismatch: bool = False) -> dict[str, Any]:
    """Evaluate a sample npz/folder against REF.npz; the sample size must equal the reference size."""
    ref = load_reference(ref_path)
    batches, count, size = iter_sample_batches(samples, batch_size)
    ref_size = tuple(ref.meta.get("size", ()))
    if ref_size and tuple(ref_size) != size and not allow_size_mismatch:
        raise ValueError(f"samples are {format_size(size)} but reference {str(ref_path)!r} is "
                         f"{format_size(ref_size)}; use the reference of that size (or --allow_size_mismatch)")
    result = evaluate_batches(batches, ref, extractor, ref_path=ref_path, pr_dtype=pr_dtype, expected=count)
    result.update({"samples": str(samples), "size": list(size)})
    return result


# --------------------------------------------------------------------------------------------------- sweeps

def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML: {name, published_model, defaults, settings: [{size, method, steps, cfg_scale, ...}]}."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("settings"), list) or not data["settings"]:
        raise ValueError(f"sweep file {str(path)!r} needs a non-empty 'settings' list")
    defaults = data.get("defaults", {}) or {}
    settings = []
    for raw in data["settings"]:
        entry = {**defaults, **raw}
        for key in ("size", "method", "steps", "cfg_scale", "cfg_interval"):
            if key not in entry:
                raise ValueError(f"sweep {str(path)!r} setting {raw} lacks {key!r}")
        entry["size"] = format_size(parse_size(str(entry["size"])))
        entry["cfg_interval"] = [float(v) for v in entry["cfg_interval"]]
        settings.append(entry)
    return {**data, "settings": settings}


SampleFn = Callable[[dict[str, Any], Path], Path]


def default_sample_fn(ckpt: str, num: int, device: str = "auto", extra: dict[str, Any] | None = None) -> SampleFn:
    """Sample one setting with `nit_lightning.commands.sample.run_sample` -> that size's ADM npz path."""

    def run(setting: dict[str, Any], out_dir: Path) -> Path:
        from nit_lightning.commands.sample import SampleSettings, run_sample

        size = parse_size(setting["size"])
        passthrough = {k: setting[k] for k in ("seed", "tokens_per_pack", "rope_layout", "precision", "dtype")
                       if k in setting}
        settings = SampleSettings(ckpt=str(ckpt), out=str(out_dir), sizes=[size], num_samples=num,
                                  method=setting["method"], steps=int(setting["steps"]),
                                  cfg_scale=float(setting["cfg_scale"]), cfg_interval=tuple(setting["cfg_interval"]),
                                  device=device, **passthrough, **(extra or {}))
        result = run_sample(settings)  # {"HxW": npz path}
        if format_size(size) not in result:
            raise RuntimeError(f"run_sample returned {sorted(result)}, not the requested {format_size(size)}")
        return Path(result[format_size(size)])

    return run


def run_sweep(sweep_path: str | Path, *, ref_dir: str | Path, out: str | Path, num: int,
              extractor: FeatureExtractor, sample_fn: SampleFn, only: list[str] | None = None,
              tb: bool = True, pr_dtype: torch.dtype = torch.float32,
              identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample + evaluate every setting; resumable per setting; failures reported, the others still run.

    `identity` (e.g. {"ckpt": path}) joins the setting, num and features in the record that decides reuse.
    """
    sweep = load_sweep(sweep_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = sweep["settings"]
    if only:
        wanted = {format_size(parse_size(s)) for s in only}
        unknown = wanted - {s["size"] for s in settings}
        if unknown:
            raise ValueError(f"--settings {sorted(unknown)} not in {sweep_path} (has {[s['size'] for s in settings]})")
        settings = [s for s in settings if s["size"] in wanted]
    results: dict[str, Any] = {}
    rank = distributed.current().rank
    for setting in settings:
        name = setting["size"]
        setting_dir = out / name
        done_file = setting_dir / "result.json"
        config = {"setting": setting, "num": num, "features": extractor.name, **(identity or {})}
        if done_file.is_file():
            previous = json.loads(done_file.read_text())
            if previous.get("config") == config and previous.get("status") == "ok":
                log.info("sweep %s: reusing the finished result in %s", name, done_file)
                results[name] = previous
                continue
        setting_dir.mkdir(parents=True, exist_ok=True)
        try:
            ref_path = Path(ref_dir) / f"{name}.npz"
            if not ref_path.is_file():
                raise FileNotFoundError(f"no reference for {name}: expected {ref_path} (build it with `python -m "
                                        f"nit_lightning reference build --size {name} --out {ref_path} ...`)")
            samples = sample_fn(setting, out / "samples")
            if rank != 0:  # under torchrun every rank samples its share; rank 0 alone evaluates and writes
                results[name] = {"status": "sampled", "config": config}
                continue
            metrics = evaluate_samples(samples, ref_path, extractor, pr_dtype=pr_dtype)
            if metrics["num_samples"] != num:
                raise RuntimeError(f"{samples} holds {metrics['num_samples']} samples, the sweep asked for {num}")
            record = {"status": "ok", "config": config, "metrics": metrics, "published": setting.get("published")}
            done_file.write_text(json.dumps(record, indent=2, default=_json_default))
        except Exception as error:  # one setting's failure must not stop the others
            log.error("sweep %s failed: %s", name, error)
            record = {"status": "failed", "config": config, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        results[name] = record
    if rank != 0:
        return {"results": results}
    summary = {"sweep": str(sweep_path), "name": sweep.get("name"), "published_model": sweep.get("published_model"),
               "num": num, "features": extractor.name, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "results.md").write_text(results_markdown(summary, settings))
    if tb:
        _log_tensorboard(out / "tb", results)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (np.ndarray, Path)):
        return value.tolist() if isinstance(value, np.ndarray) else str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_markdown(summary: dict[str, Any], settings: list[dict[str, Any]]) -> str:
    """A paper-style table: ours, with the published numbers in parentheses."""
    lines = [f"# Sweep {summary.get('name') or ''}: {summary['num']} samples per setting", "",
             f"Features: `{summary['features']}`" + ("" if is_reference_grade(summary["features"])
                                                     else f" — **{NOT_INCEPTION}**"),
             f"Published numbers (in parentheses): {summary.get('published_model') or 'n/a'}", "",
             "| size (HxW) | solver, NFE | CFG | interval | N | FID | sFID | IS | Prec | Rec |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    digits = {"fid": 2, "sfid": 2, "is": 2, "precision": 3, "recall": 3}
    for setting in settings:
        record = summary["results"].get(setting["size"], {})
        lo, hi = setting["cfg_interval"]
        head = (f"| {setting['size']} | {setting['method'].upper()} {setting['steps']} | {setting['cfg_scale']} | "
                f"[{lo:g}, {hi:g}] |")
        if record.get("status") != "ok":
            lines.append(f"{head} – | failed: {record.get('error', 'not run')[:80]} | | | | |")
            continue
        m, pub = record["metrics"], setting.get("published") or {}
        cells = [f"{_fmt(m.get(k), digits[k])} ({_fmt(pub.get(k), digits[k])})" for k in METRIC_KEYS]
        lines.append(f"{head} {m['num_samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log_tensorboard(log_dir: Path, results: dict[str, Any]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        log.warning("tensorboard not installed: no TensorBoard scalars written")
        return
    with SummaryWriter(str(log_dir)) as writer:
        for name, record in results.items():
            if record.get("status") == "ok":
                for key in METRIC_KEYS:
                    if key in record["metrics"]:
                        writer.add_scalar(f"sweep/{name}/{key}", record["metrics"][key], 0)
