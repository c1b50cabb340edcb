"""Demo steps 4–5: class-balanced samples per size with CFG + interval, then metrics against the references."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nit_lightning.demo.data import DemoPaths
from nit_lightning.demo.settings import DemoSettings

log = logging.getLogger(__name__)
FEATURE_LABELS = {"featurenet": "feature net: demo CNN, not Inception", "inception": "Inception-v3 (FID network)"}


def sample_run(settings: DemoSettings, paths: DemoPaths, name: str, ckpt: Path, info: dict[str, Any]) -> dict[str, Path]:
    """Step 4: `num_samples` images per size (label i mod K, seed per image); `run_sample` resumes from its PNGs."""
    from nit_lightning.data.sizes import parse_size
    from nit_lightning.generation.sample_set import SampleRun, run_sample
    from nit_lightning.generation.settings import SamplerSettings, SweepSetting

    out = paths.run(name) / "samples"
    before = sum(1 for _ in out.glob("*/done.json")) if out.is_dir() else 0
    sampler = SamplerSettings(method=settings.method, steps=settings.sample_steps, cfg_scale=settings.cfg_scale,
                              cfg_interval=tuple(settings.cfg_interval))
    sample = SampleRun(
        ckpt=str(ckpt), out=str(out), settings=[SweepSetting(parse_size(s), sampler) for s in settings.sizes],
        num_samples=settings.num_samples, seed=settings.seed, tokens_per_pack=settings.sample_tokens_per_pack,
        device="cpu", progress=False,
    )
    npz = run_sample(sample)
    if before == len(settings.sizes):
        info["status"] = "reused"
    info["images"] = settings.num_samples * len(settings.sizes)
    return {size: Path(path) for size, path in npz.items()}


def _stamp(path: Path) -> str:
    """Path, size and mtime: a rebuilt sample npz or reference invalidates the metrics computed from it."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def class_accuracy(npz: Path, extractor: Any, batch_size: int = 256) -> float:
    """Share of samples that the feature net classifies as the class they were generated for (arr_1)."""
    from nit_lightning.evaluation.reference import nhwc_to_tensor

    with np.load(npz, allow_pickle=False) as data:
        images, labels = data["arr_0"], data["arr_1"]
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = extractor(nhwc_to_tensor(images[start:start + batch_size]))["logits"]
        correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def evaluate_run(settings: DemoSettings, paths: DemoPaths, name: str, samples: dict[str, Path],
                 extractors: dict[str, Any], references: dict[str, dict[str, Path]],
                 info: dict[str, Any]) -> dict[str, Any]:
    """Step 5: FID / sFID / IS / precision / recall / class accuracy per size and extractor -> runs/<name>/metrics.json."""
    from nit_lightning.evaluation.evaluate import evaluate_samples

    path = paths.run(name) / "metrics.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    made = 0
    for features, extractor in extractors.items():
        table = record.setdefault(features, {})
        for size in settings.sizes:
            npz = samples[size]
            key = f"{_stamp(npz)}|{_stamp(references[features][size])}|{extractor.name}"  # redone if either changed
            if table.get(size, {}).get("key") == key:
                continue
            result = evaluate_samples(npz, references[features][size], extractor, batch_size=128)
            row = {k: result[k] for k in ("fid", "sfid", "is", "precision", "recall", "num_samples",
                                           "num_reference_images") if k in result}
            if features == "featurenet":  # the demo net is a classifier of exactly the demo's classes
                row["class_acc"] = class_accuracy(npz, extractor)
            row.update(features=result["features"], label=FEATURE_LABELS.get(features, features), key=key,
                       reference_images=result["reference_meta"].get("num_images"))
            table[size] = row
            made += 1
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)
    if made == 0:
        info["status"] = "reused"
    return record


def load_extractors(paths: DemoPaths, specs: dict[str, str]) -> dict[str, Any]:
    """{"featurenet": the demo net, "inception": FID Inception when NIT_INCEPTION_WEIGHTS is set}."""
    from nit_lightning.evaluation.features import load_feature_extractor

    out = {"featurenet": load_feature_extractor(f"featurenet:{paths.featurenet}", device="cpu", batch_size=128)}
    for name, spec in specs.items():
        out[name] = load_feature_extractor(spec, device="cpu", batch_size=32, dtype=torch.float32)
    return out
