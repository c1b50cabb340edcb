"""The CPU end-to-end demo, driven by one config file (experiments/demo.yaml): run it, or a demo-scale sweep.

Steps, each skipped when its outputs exist (a rerun resumes): synthetic images -> the codec (a tinyae trained here, or
a fixed one) -> latent shards -> the demo's feature net and shape classifier -> reference statistics -> per run: fit
(EMA, TensorBoard, sample grids) -> samples at seen and unseen sizes -> metrics -> OUT/report.md. `--ablation` trains
every data mixture of the config, for each of its ablation seeds. `--sweep FILE` runs a demo-scale sweep
(experiments/sweeps/demo_*.yaml) on the trained demo model: what `make eval-res-sweep` / `make eval-ar-sweep` do
without a CKPT. Every value lives in the config; this file only fills in `${out}`, `${run}`, `${seed}`, `${sources}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nit_lightning.demo import report
from nit_lightning.demo.steps import Demo, accuracy_metrics
from nit_lightning.records import folder_lock


def run_demo(config: dict[str, Any], out: str | Path, *, ablation: bool = False, threads: int | None = None) -> dict:
    """Run (or resume) the demo; returns {"report": path, "metrics": {run: ...}, "timings": {...}}."""
    import torch

    demo = Demo(config, out, ablation=ablation)
    torch.set_num_threads(int(threads or demo.config["threads"]))
    with folder_lock(demo.out, "demo"):  # one demo per output folder
        return _run_steps(demo)


def _run_steps(demo: Demo) -> dict:
    demo.check_settings()
    report.banner(demo)
    demo.make_images()
    codec = demo.codec_spec()
    shard_dirs = {mode: demo.make_shards(mode, codec) for mode in dict.fromkeys(m for ms, _ in demo.runs().values()
                                                                                  for m in ms)}
    nets = demo.make_classifiers()
    extractors = demo.extractors(nets["featurenet"])
    refs = demo.references(extractors, demo.sizes)
    real = report.real_shape_accuracy(demo, nets["shape"])
    metrics: dict[str, Any] = {}
    for name, (modes, seed) in demo.runs().items():
        ckpt = demo.train(name, [shard_dirs[m] for m in modes], seed)
        samples = demo.sample(name, ckpt)
        report.samples_grid(demo, name, samples)
        metrics[name] = demo.evaluate(name, samples, extractors, refs, nets["shape"])
        report.write(demo, metrics, real)  # a partial report after every run
    path = report.write(demo, metrics, real)
    report.print_summary(demo, metrics, path)
    return {"report": path, "metrics": metrics, "timings": demo.timer.records}


def run_demo_sweep(config: dict[str, Any], out: str | Path, sweep_path: str, threads: int | None = None) -> int:
    """A demo-scale sweep on the trained default run: references at the sweep's sizes, then the suite's run_sweep."""
    import torch

    from nit_lightning.evaluation.sweep import run_sweep
    from nit_lightning.generation.pipeline import load_pipeline
    from nit_lightning.generation.settings import load_sweep

    demo = Demo(config, out)
    torch.set_num_threads(int(threads or demo.config["threads"]))
    name = next(iter(demo.runs()))
    ckpt = demo.out / "runs" / name / "checkpoints" / "final.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist: run `make demo` first (or pass CKPT=... for a real model)")
    sweep = load_sweep(sweep_path)
    featurenet = demo.eval / "featurenet.pt"
    extractors = {"featurenet": demo.extractors(featurenet)["featurenet"]}
    demo.references(extractors, [s.size for s in sweep.settings])
    out_dir = demo.out / "sweeps" / Path(sweep_path).stem
    extra = accuracy_metrics(extractors["featurenet"], demo.eval / "shape.pt")  # class and shape accuracy columns
    summary = run_sweep(sweep, ref_dir=demo.reference_dir("featurenet"), out=out_dir,
                        num=int(demo.config["sample"]["num_samples"]), extractor=extractors["featurenet"],
                        pipeline=load_pipeline(ckpt), seed=int(demo.config["seed"]),
                        tokens_per_forward=int(demo.config["sample"]["tokens_per_forward"]), extra_metrics=extra)
    print((out_dir / "results.md").read_text())
    print(f"TensorBoard:  tensorboard --logdir {out_dir / 'tb'}")
    return 1 if any(r["status"] == "failed" for r in summary["results"].values()) else 0
