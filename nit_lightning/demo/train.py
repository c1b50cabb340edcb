"""Demo step 3: one training run per data mixture through the suite's LightningCLI, from experiments/demo.yaml."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from nit_lightning.demo.data import DemoPaths
from nit_lightning.demo.settings import DemoSettings

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_config(path: str) -> Path:
    """The base YAML, relative to the working directory or, failing that, to the repository root."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"demo training config {path!r} not found (looked in {Path.cwd()} and {REPO_ROOT}); "
                            "pass --config experiments/demo.yaml from the repository root")


def _callback(config: dict[str, Any], suffix: str) -> dict[str, Any]:
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith(suffix):
            return cb.setdefault("init_args", {})
    raise KeyError(f"the demo config has no callback {suffix!r}; experiments/demo.yaml must list it")


def run_config(settings: DemoSettings, paths: DemoPaths, name: str, modes: list[str]) -> dict[str, Any]:
    """The base YAML with this run's data mixture, sizes, steps and output folders filled in."""
    config = yaml.safe_load(resolve_config(settings.config).read_text())
    run = paths.run(name)
    config["seed_everything"] = settings.seed
    net = config["model"]["net"]
    net.update(depth=settings.depth, hidden_size=settings.hidden_size, num_heads=settings.num_heads,
               num_classes=settings.num_classes)
    config["model"].update(lr=settings.lr, seed=settings.seed)
    if settings.quick:
        config["model"]["warmup_steps"] = 0
    config["data"].update(sources=[{"path": str(paths.shard_dir(m)), "weight": 1.0} for m in modes],
                          tokens_per_pack=settings.tokens_per_pack, seed=settings.seed)
    trainer = config["trainer"]
    trainer["max_steps"] = settings.train_steps
    trainer["log_every_n_steps"] = max(1, min(10, settings.train_steps // 4))
    trainer["logger"]["init_args"].update(save_dir=str(run), name="tb", version="")
    _callback(config, "EMA")["decay"] = settings.ema_decay
    ckpt = _callback(config, "ModelCheckpoint")
    ckpt.update(dirpath=str(run / "checkpoints"), every_n_train_steps=settings.grid_every)
    _callback(config, "ThroughputMonitor")["window"] = max(1, min(10, settings.train_steps // 4))
    grid = _callback(config, "SampleGridCallback")
    grid.update(every_n_steps=settings.grid_every, sizes=list(settings.sizes), classes=list(settings.grid_classes),
                nrow=len(settings.grid_classes), save_dir=str(run / "grids"), at_train_end=True)
    grid["sampler"].update(steps=settings.sample_steps, cfg_scale=settings.cfg_scale,
                           cfg_interval=list(settings.cfg_interval))
    return config


def train_run(settings: DemoSettings, paths: DemoPaths, name: str, modes: list[str],
              info: dict[str, Any]) -> Path:
    """Fit one run (resuming from its last.ckpt when interrupted); returns the final checkpoint."""
    from nit_lightning.cli.lightning import run_cli

    run = paths.run(name)
    done = run / "train_done.json"
    final = run / "checkpoints" / "final.ckpt"  # written once training reached max_steps
    last = run / "checkpoints" / "last.ckpt"  # ModelCheckpoint's, every grid_every steps: what a resume starts from
    config = run_config(settings, paths, name, modes)
    if done.is_file() and final.is_file():
        if json.loads(done.read_text()).get("config") == config:
            info["status"] = "reused"
            return final
        raise ValueError(f"{run} was trained with another config; use another --out or delete {run}")
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["fit", "--config", str(config_path)]
    if last.is_file():  # an interrupted run continues where it stopped (weights, EMA, optimiser, data position)
        log.info("resuming %s from %s", name, last)
        argv += ["--ckpt_path", str(last)]
        info["resumed"] = True
    cli = run_cli(argv)
    trainer = cli.trainer
    if trainer.global_step < settings.train_steps:
        raise RuntimeError(f"run {name} stopped at step {trainer.global_step} of {settings.train_steps}; rerun the "
                           f"demo to resume from {last}")
    # Saved through the trainer, so it carries nit_meta and the EMA weights like every checkpoint of the suite.
    trainer.save_checkpoint(final)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    info.update(steps=trainer.global_step, final_loss=metrics.get("train/loss"))
    done.write_text(json.dumps({"config": config, "steps": trainer.global_step, "metrics": metrics}, indent=1))
    return final
