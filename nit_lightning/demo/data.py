"""Demo steps 1–2 and the evaluation assets: synthetic images, latent shards, the feature net, reference statistics."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from nit_lightning.data.sizes import parse_size
from nit_lightning.demo.settings import DemoSettings

log = logging.getLogger(__name__)

INCEPTION_ENV = "NIT_INCEPTION_WEIGHTS"  # a local pt_inception-2015-12-05-6726825d.pth turns on Inception metrics


class DemoPaths:
    """Where every output of the demo lies under OUT."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.images = self.out / "data" / "images"  # train/<class>/*.png, val/<class>/*.png, synth.json
        self.shards = self.out / "data" / "shards"  # <mode>/ (native, fixed-64, fixed-128)
        self.eval = self.out / "eval"
        self.featurenet = self.eval / "featurenet.pt"
        self.runs = self.out / "runs"

    def shard_dir(self, mode: str) -> Path:
        return self.shards / mode

    def references(self, features: str) -> Path:
        return self.eval / ("references" if features == "featurenet" else f"references_{features}")

    def run(self, name: str) -> Path:
        return self.runs / name


def make_images(settings: DemoSettings, paths: DemoPaths, info: dict[str, Any]) -> dict[str, Any]:
    """Step 1: the procedural native-resolution set, split train/val; reused when synth.json (written last) exists."""
    from nit_lightning.data.synthetic import SynthSettings, write_synthetic

    synth = SynthSettings(out=str(paths.images), num_images=settings.num_images, num_classes=settings.num_classes,
                          min_side=settings.min_side, max_side=settings.max_side, seed=settings.seed,
                          val_fraction=settings.val_fraction)
    manifest_path = paths.images / "synth.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        wanted = {k: v for k, v in synth.__dict__.items() if k != "out"}
        if manifest.get("settings") != wanted:
            raise ValueError(f"{paths.images} holds images made with other settings ({manifest.get('settings')} vs "
                             f"{wanted}); use another --out or delete {paths.images}")
        info["status"] = "reused"
        return manifest
    manifest = write_synthetic(synth)
    info.update(counts=manifest["counts"])
    return manifest


def make_shards(settings: DemoSettings, paths: DemoPaths, mode: str, info: dict[str, Any]) -> dict[str, Any]:
    """Step 2: latent shards of the training images in one mode (`prepare` itself resumes unfinished shards)."""
    from nit_lightning.data.prepare import PrepareSettings, run_prepare

    out = paths.shard_dir(mode)
    index_path = out / "index.json"
    if index_path.is_file():
        info["status"] = "reused"
        return json.loads(index_path.read_text())
    prep = PrepareSettings(input=str(paths.images / "train"), output=str(out), mode=mode, codec=settings.codec,
                           flip=True, samples_per_shard=settings.samples_per_shard, batch_size=32)
    result = run_prepare(prep)
    if result["failed"] or result["index"] is None:
        raise RuntimeError(f"prepare {mode} into {out} left shards unfinished: {result['failed']}; rerun the demo to retry")
    index = result["index"]
    info.update(samples=index["num_samples"], skipped=index["counts"].get("skipped"))
    skipped = sum(index["counts"].get("skipped", {}).values())
    if skipped:  # never silent: the report repeats this count
        log.warning("prepare %s: %d of %d images skipped: %s", mode, skipped, index["counts"]["listed"],
                    index["counts"]["skipped"])
    return index


def make_featurenet(settings: DemoSettings, paths: DemoPaths, info: dict[str, Any]) -> dict[str, Any]:
    """Step 5a: the small CNN classifier (NOT Inception) trained on the training images; its report."""
    import torch

    from nit_lightning.evaluation.featurenet import train_featurenet

    if paths.featurenet.is_file():
        info["status"] = "reused"
        return torch.load(paths.featurenet, map_location="cpu", weights_only=True)["report"]
    report = train_featurenet(paths.images / "train", paths.featurenet, epochs=settings.featurenet_epochs,
                              size=settings.featurenet_size, batch_size=64, lr=2e-3, seed=settings.seed)
    info.update({k: report[k] for k in ("train_acc", "val_acc") if k in report})
    return report


def feature_specs() -> dict[str, str]:
    """Which feature extractors the demo evaluates with: the demo net always, Inception when its weights are given."""
    paths: dict[str, str] = {}
    weights = os.environ.get(INCEPTION_ENV)
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{INCEPTION_ENV}={weights!r} is not a file; point it at "
                                    "pt_inception-2015-12-05-6726825d.pth or unset it")
        paths["inception"] = f"inception:{weights}"
    return paths


def make_references(settings: DemoSettings, paths: DemoPaths, extractors: dict[str, Any],
                    info: dict[str, Any]) -> dict[str, dict[str, Path]]:
    """Step 5b: reference statistics per sample size from the held-out val images, per feature extractor."""
    from nit_lightning.evaluation.reference import build_reference, save_reference

    made, out = 0, {}
    for features, extractor in extractors.items():
        folder = paths.references(features)
        out[features] = {}
        for size in settings.sizes:
            path = folder / f"{size}.npz"
            out[features][size] = path
            if path.is_file():
                continue
            ref = build_reference(paths.images / "val", parse_size(size), extractor, subset=settings.reference_subset,
                                  seed=settings.seed, batch_size=128, num_workers=1)
            save_reference(path, ref)
            made += 1
    if made == 0:
        info["status"] = "reused"
    info["built"] = made
    return out
