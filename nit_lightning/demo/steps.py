"""The demo's steps, each skipped when its outputs exist (a rerun resumes): data, codec, shards, the evaluation nets
and references, then per run fit, sample and evaluate. Values come from the config only (cli/demo.py loads it)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nit_lightning.cli.lightning import run_cli
from nit_lightning.data.sizes import parse_size
from nit_lightning.demo import report
from nit_lightning.demo.config import fill
from nit_lightning.records import SettingsRecord, read_json, write_json, write_text

INCEPTION_ENV = "NIT_INCEPTION_WEIGHTS"  # a local pt_inception-2015-12-05-6726825d.pth adds Inception metrics
RUN_FLAGS = ("threads",)  # may change between a run and its resume: they decide speed, not results


def accuracy_metrics(featurenet: Any, shape: Path) -> dict[str, Callable[[Path], float]]:
    """The demo's two accuracies of an ADM npz (labels i mod K): class (the feature net, or an extractor holding it)
    and shape (the grayscale shape classifier at `shape`). The demo's metrics and its sweeps' extra columns."""
    from nit_lightning.evaluation.classifiers import accuracy, shape_accuracy
    from nit_lightning.evaluation.featurenet import load_featurenet

    classifier = load_featurenet(shape)
    return {"class_acc": lambda npz: accuracy(npz, None, featurenet),
            "shape_acc": lambda npz: shape_accuracy(npz, None, classifier)}


def _recorded_config(done: Path) -> dict[str, Any]:
    """The fit config of a finished run's train_done.json (a record, or the format before records: {"config": ...})."""
    content = read_json(done, "demo run record")
    return content["config"] if "config" in content else SettingsRecord.read(done, "demo-run").settings


class Demo:
    """The demo's folders and steps; `config` is the loaded YAML with ${out} filled in."""

    def __init__(self, config: dict[str, Any], out: str | Path, *, ablation: bool = False) -> None:
        self.out = Path(out)
        self.config = fill(config, out=str(self.out))
        self.ablation = ablation
        self.images, self.shards, self.eval = self.out / "data" / "images", self.out / "data" / "shards", self.out / "eval"
        self.sizes = [parse_size(s) for s in self.config["sample"]["sizes"]]
        self.timer = report.StepTimer(self.out / "timings.json")

    # -- which runs ------------------------------------------------------------------------------------------------
    def runs(self) -> dict[str, tuple[list[str], int]]:
        """Run name -> (prepare modes of its data, training seed): the first mixture, or all of them × the seeds.

        A run with the config's own seed is named after its mixture alone, so `--ablation` after a plain demo
        reuses that demo's run; the runs of other seeds are `<mixture>-s<seed>`."""
        mixtures, base = self.config["runs"], int(self.config["seed"])
        if not self.ablation:
            name = next(iter(mixtures))
            return {name: (mixtures[name], base)}
        seeds = [int(s) for s in self.config["ablation"]["seeds"]]
        return {report.run_name(name, seed, base): (modes, seed) for seed in seeds for name, modes in mixtures.items()}

    def check_settings(self) -> None:
        """Refuse to resume into an OUT made with other settings (its outputs would mix); record them otherwise."""
        record = SettingsRecord("demo", {k: v for k, v in self.config.items() if k not in RUN_FLAGS})
        record.check(self.out / "settings.json", what="a demo", ignore=set(RUN_FLAGS),
                     remedy=f"use another --out or delete {self.out}")

    # -- 1-2: data ---------------------------------------------------------------------------------------------------
    def make_images(self) -> None:
        from nit_lightning.data.synthetic import SynthSettings, write_synthetic

        with self.timer.step("1-images", "synthetic native-resolution images") as info:
            if (self.images / "synth.json").is_file():
                info["status"] = "reused"  # write_synthetic refuses a folder made with other settings
                return
            write_synthetic(SynthSettings(out=str(self.images), seed=int(self.config["seed"]), **self.config["images"]))

    def codec_spec(self) -> str:
        """The codec spec of the shards: `spec` as given; a tinyae file is trained first (step 2a)."""
        codec = self.config["codec"]
        spec = str(codec["spec"])
        if spec.startswith("tinyae:"):
            path = Path(spec.split(":", 1)[1])
            with self.timer.step("2a-tinyae", "tiny autoencoder codec on the training images") as info:
                if path.is_file():
                    info["status"] = "reused"
                else:
                    from nit_lightning.data.tinyae import TinyAEConfig, TinyAETrainSettings, train_tinyae

                    trained = train_tinyae(self.images / "train", path, TinyAEConfig(**codec["tinyae"]["config"]),
                                           TinyAETrainSettings(**codec["tinyae"]["train"]))
                    info.update({k: v for k, v in trained.items() if isinstance(v, (int, float, str))})
        return spec

    def make_shards(self, mode: str, codec: str, **extra: Any) -> Path:
        """Latent shards of the training images (`extra`: more PrepareSettings, e.g. the T2I demo's captions)."""
        from nit_lightning.data.prepare import PrepareSettings, run_prepare

        out = self.shards / mode
        what = f"latent shards ({codec}, {mode}{', ' + ', '.join(sorted(extra)) if extra else ''})"
        with self.timer.step(f"2b-shards-{mode}", what) as info:
            if (out / "index.json").is_file():
                info["status"] = "reused"
                return out
            result = run_prepare(PrepareSettings(input=str(self.images / "train"), output=str(out), mode=mode,
                                                 codec=codec, flip=True, **self.config["shards"], **extra))
            if result["failed"] or result["index"] is None:
                raise RuntimeError(f"prepare {mode} into {out} left shards unfinished: {result['failed']}; rerun")
            info.update(samples=result["index"]["num_samples"], skipped=result["index"]["counts"].get("skipped"))
        return out

    # -- 3: the evaluation nets and references -------------------------------------------------------------------------
    def make_classifiers(self) -> dict[str, Path]:
        """The demo feature net (RGB, FID stand-in) and the shape classifier (grayscale, standardised per image)."""
        from nit_lightning.evaluation.classifiers import train_featurenet

        nets = {"featurenet": (self.eval / "featurenet.pt", "rgb"), "shape": (self.eval / "shape.pt", "gray-std")}
        settings = self.config["evaluate"]
        for name, (path, kind) in nets.items():
            with self.timer.step(f"3-{name}", f"demo {name} classifier (NOT Inception) on the training images") as info:
                if path.is_file():
                    info["status"] = "reused"
                    continue
                trained = train_featurenet(self.images / "train", path, input=kind, seed=int(self.config["seed"]),
                                           **settings[name])
                info.update({k: trained[k] for k in ("train_acc", "val_acc") if k in trained})
        return {name: path for name, (path, _) in nets.items()}

    def extractors(self, featurenet: Path) -> dict[str, Any]:
        """The demo feature net always; the FID Inception too when NIT_INCEPTION_WEIGHTS names a local file."""
        from nit_lightning.evaluation.extractors import load_feature_extractor

        out = {"featurenet": load_feature_extractor(f"featurenet:{featurenet}", batch_size=128)}
        weights = os.environ.get(INCEPTION_ENV)
        if weights:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"{INCEPTION_ENV}={weights!r} is not a file; point it at "
                                        "pt_inception-2015-12-05-6726825d.pth or unset it")
            out["inception"] = load_feature_extractor(f"inception:{weights}", batch_size=32)
        return out

    def references(self, extractors: dict[str, Any], sizes: list[tuple[int, int]]) -> dict[str, Path]:
        """Reference statistics per (extractor, size) from the held-out val images; {"<features>/<HxW>": path}."""
        from nit_lightning.data.sizes import format_size
        from nit_lightning.evaluation.reference import build_reference, save_reference

        out = {}
        with self.timer.step("3-references", f"reference statistics for {len(sizes)} sizes") as info:
            made = 0
            for features, extractor in extractors.items():
                for size in sizes:
                    path = self.reference_dir(features) / f"{format_size(size)}.npz"
                    out[f"{features}/{format_size(size)}"] = path
                    if not path.is_file():
                        save_reference(path, build_reference(self.images / "val", size, extractor, seed=0,
                                                             subset=int(self.config["evaluate"]["reference_subset"]),
                                                             batch_size=128, num_workers=1))
                        made += 1
            info.update(status="ran" if made else "reused", built=made)
        return out

    def reference_dir(self, features: str) -> Path:
        return self.eval / ("references" if features == "featurenet" else f"references_{features}")

    # -- 4: one run ------------------------------------------------------------------------------------------------
    def train(self, name: str, shard_dirs: list[Path], seed: int) -> Path:
        """Fit one run from the config's `fit` section (resuming from its last.ckpt); returns the final checkpoint."""
        run = self.out / "runs" / name
        final, last = run / "checkpoints" / "final.ckpt", run / "checkpoints" / "last.ckpt"
        sources = [{"path": str(d), "weight": 1.0} for d in shard_dirs]
        config = fill(self.config["fit"], run=name, seed=seed, sources=sources)
        steps = int(config["trainer"]["max_steps"])
        with self.timer.step(f"4-fit-{name}", f"fit {steps} steps on {' + '.join(d.name for d in shard_dirs)}") as info:
            done = run / "train_done.json"
            record = SettingsRecord("demo-run", config)
            if done.is_file() and final.is_file():
                record.refuse_if_different(_recorded_config(done), where=run, what="a run",
                                           remedy=f"use another --out or delete {run}")
                info["status"] = "reused"
                return final
            run.mkdir(parents=True, exist_ok=True)
            write_text(run / "config.yaml", yaml.safe_dump(config, sort_keys=False))
            argv = ["fit", "--config", str(run / "config.yaml")]
            if last.is_file():  # an interrupted run continues where it stopped (weights, EMA, optimiser, data)
                argv += ["--ckpt_path", str(last)]
                info["resumed"] = True
            trainer = run_cli(argv).trainer
            if trainer.global_step < steps:
                raise RuntimeError(f"run {name} stopped at step {trainer.global_step} of {steps}; rerun to resume")
            trainer.save_checkpoint(final)  # through the trainer: nit_meta and the EMA weights, like every checkpoint
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            info.update(steps=trainer.global_step, final_loss=metrics.get("loss/train"))
            record.info = {"steps": trainer.global_step, "metrics": metrics}
            record.write(done)
        return final

    def sample(self, name: str, ckpt: Path) -> dict[str, Path]:
        """Samples at every size with the checkpoint's recipe (its sampler, RoPE interpolation beyond the trained
        range), `sample.sampler` keys over it: what `python -m nit_lightning sample` does without flags."""
        from nit_lightning.generation.sample_set import SampleRun, run_sample

        settings = self.config["sample"]
        with self.timer.step(f"5-sample-{name}", f"{settings['num_samples']} samples x {len(self.sizes)} sizes") as info:
            folder = self.out / "runs" / name / "samples"
            before = len(list(folder.glob("*/done.json"))) if folder.is_dir() else 0
            paths = run_sample(SampleRun(ckpt=str(ckpt), out=str(folder), num_samples=int(settings["num_samples"]),
                                         sizes=list(self.sizes), sampler_flags=dict(settings.get("sampler") or {}),
                                         device="cpu", seed=int(self.config["seed"]),
                                         tokens_per_forward=int(settings["tokens_per_forward"]), progress=False))
            info["status"] = "reused" if before == len(self.sizes) else "ran"
        return paths

    def evaluate(self, name: str, samples: dict[str, Path], extractors: dict[str, Any], refs: dict[str, Path],
                 shape: Path) -> dict[str, Any]:
        """FID / sFID / IS / P / R per size and extractor, class accuracy (feature net), shape accuracy -> metrics.json."""
        from nit_lightning.evaluation.evaluate import evaluate_samples

        path = self.out / "runs" / name / "metrics.json"
        record = read_json(path, "demo metrics") if path.is_file() else {}
        # the demo nets classify exactly the demo's classes: accuracies come with the feature net's rows only
        accuracies = accuracy_metrics(extractors["featurenet"], shape) if "featurenet" in extractors else {}
        with self.timer.step(f"6-evaluate-{name}", "metrics per size") as info:
            made = 0
            for features, extractor in extractors.items():
                table = record.setdefault(features, {})
                for size, npz in samples.items():
                    ref = refs[f"{features}/{size}"]
                    key = f"{report.stamp(npz)}|{report.stamp(ref)}|{extractor.name}"  # redone if either changed
                    if table.get(size, {}).get("key") == key:
                        continue
                    result = evaluate_samples(npz, ref, extractor, batch_size=128)
                    row = {k: result[k] for k in ("fid", "sfid", "is", "precision", "recall", "num_samples") if k in result}
                    if features == "featurenet":
                        row.update({key: fn(npz) for key, fn in accuracies.items()})
                    row.update(features=result["features"], key=key)
                    table[size] = row
                    made += 1
                    write_json(path, record)
            info["status"] = "ran" if made else "reused"
        return record
